"""Improved precision and recall of generated samples (Kynkäänniemi et al., NeurIPS 2019) on feature vectors.

Each set's manifold is the union of balls around its points, each ball reaching the point's ``k``-th nearest
neighbour in its own set. Precision is the share of generated points inside the real manifold (fidelity),
recall the share of real points inside the generated manifold (coverage). MONAI and Ignite have no version of it.
"""

from __future__ import annotations

import torch


def _check(features: torch.Tensor, name: str, k: int) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"`{name}` must be features (N, D), got shape {tuple(features.shape)}.")
    if features.shape[0] <= k:
        raise ValueError(f"`{name}` has {features.shape[0]} points; precision/recall with k={k} needs more than k.")
    return features.detach().double().cpu()


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every point to its ``k``-th nearest neighbour in its own set (itself excluded)."""
    return torch.cdist(features, features).kthvalue(k + 1, dim=1).values


def _inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each query lies within the ball of at least one point."""
    return (torch.cdist(queries, points) <= radii[None, :]).any(dim=1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """``{"precision", "recall"}`` of generated features ``fake`` ``(M, D)`` against real features ``real``
    ``(N, D)``, with ``k``-nearest-neighbour manifolds (the paper uses ``k = 3``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    real, fake = _check(real, "real", k), _check(fake, "fake", k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"Feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}.")
    precision = _inside(fake, real, _radii(real, k)).double().mean().item()
    recall = _inside(real, fake, _radii(fake, k)).double().mean().item()
    return {"precision": precision, "recall": recall}
