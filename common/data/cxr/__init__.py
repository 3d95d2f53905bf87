"""Chest X-ray data: procedural radiographs with reports and known findings, and preparation of MIMIC-CXR-JPG."""
