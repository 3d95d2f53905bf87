"""Frechet inception distance between two feature sets."""

from __future__ import annotations

import torch
from monai.metrics import FIDMetric


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID between feature sets ``(N, D)`` and ``(M, D)`` with MONAI's ``FIDMetric``."""
    if real_features.shape[0] < 2 or fake_features.shape[0] < 2:
        raise ValueError("FID needs at least 2 feature vectors per set.")
    return float(FIDMetric()(fake_features.double(), real_features.double()))
