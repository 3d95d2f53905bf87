"""data/brain"""
