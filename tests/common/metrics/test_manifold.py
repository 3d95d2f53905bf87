"""common.metrics.manifold: k-NN precision (fidelity) and recall (coverage) of generated features."""

from __future__ import annotations

import pytest
import torch

from common.metrics.manifold import precision_recall


def _points(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)) + shift


def test_samples_of_the_real_distribution_score_high_and_far_ones_zero():
    real = _points(200, 0)
    same = precision_recall(real, _points(200, 1))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    assert precision_recall(real, _points(200, 1, shift=20.0)) == {"precision": 0.0, "recall": 0.0}
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}


def test_mode_collapse_keeps_precision_and_loses_recall():
    real = _points(300, 0)
    collapsed = 0.05 * _points(300, 1)  # every sample near the centre of the real distribution
    result = precision_recall(real, collapsed)
    assert result["precision"] > 0.9 and result["recall"] < 0.2


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(_points(3, 0), _points(10, 1), k=3)
    with pytest.raises(ValueError, match="Feature sizes differ"):
        precision_recall(_points(10, 0), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="positive integer"):
        precision_recall(_points(10, 0), _points(10, 1), k=0)
