"""Datasets, dict transforms and phantom generators."""
