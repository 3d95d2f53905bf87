"""Per-image PSNR, MAE and MS-SSIM between a generated image and its true target."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric

from common.metrics.ms_ssim import build_ms_ssim


class PairedImageMetrics:
    """Per-image PSNR (``max_val`` 1.0), MAE and MS-SSIM between ``pred`` and ``label`` ``(B, 1, H, W)``.

    Uses MONAI's metrics with ``reduction="none"`` so that the standard deviation over images can be
    reported beside the mean.
    """

    def __init__(self, image_size: Sequence[int]) -> None:
        self.metrics = {
            "psnr": PSNRMetric(max_val=1.0, reduction="none"),
            "mae": MAEMetric(reduction="none"),
            "ms_ssim": build_ms_ssim(image_size, reduction="none"),
        }

    def __call__(self, pred: torch.Tensor, label: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"psnr", "mae", "ms_ssim"}`` -> arrays ``(B,)``."""
        pred, label = pred.float().clamp(0, 1), label.float()
        return {
            name: metric(pred, label).reshape(pred.shape[0], -1).mean(1).cpu().numpy()
            for name, metric in self.metrics.items()
        }
