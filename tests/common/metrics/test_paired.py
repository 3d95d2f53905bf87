"""common.metrics.paired: per-image PSNR, MAE and MS-SSIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.metrics.paired import PairedImageMetrics


def test_paired_metrics_values():
    label = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    pred = label.clone()
    pred[1] = (pred[1] + 0.1).clamp(0, 1)
    m = PairedImageMetrics((64, 64))(pred, label)
    assert m["mae"][0] == 0 and 0.05 < m["mae"][1] < 0.1
    assert m["psnr"][1] == pytest.approx(-10 * np.log10(((pred[1] - label[1]) ** 2).mean().item()), rel=1e-4)
    assert m["ms_ssim"][0] == pytest.approx(1.0, abs=1e-4) and m["ms_ssim"][1] < 1
