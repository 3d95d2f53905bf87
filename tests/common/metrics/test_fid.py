"""common.metrics.fid: Frechet distance between feature sets."""

from __future__ import annotations

import pytest
import torch

from common.metrics.fid import frechet_distance


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-4)
    # Same covariance, mean shifted by 1 in each of 4 dimensions: FID = |mu_1 - mu_2|^2 = 4.
    assert frechet_distance(real, real + 1.0) == pytest.approx(4.0, abs=1e-3)
    other = torch.randn(200, 4, generator=g)
    assert 0 < frechet_distance(real, other) < frechet_distance(real, other + 1.0)
    assert frechet_distance(real, other) == pytest.approx(frechet_distance(other, real), rel=1e-4)


def test_frechet_distance_needs_two_vectors_per_set():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(5, 4), torch.randn(1, 4))
