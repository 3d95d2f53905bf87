"""Evaluation as the papers report it, and publishing its results into a bundle's docs on request."""
