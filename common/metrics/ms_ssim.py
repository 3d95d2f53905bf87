"""MS-SSIM as the papers report it: fidelity (against a reference) and diversity (between samples)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import MultiScaleSSIMMetric

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_settings(image_size: Sequence[int], max_kernel: int = 11) -> dict[str, Any]:
    """MS-SSIM arguments valid for ``image_size``: the 5 standard scales with the largest odd kernel <= 11.

    MONAI requires ``min(size) // (scales - 1) ** 2 > kernel_size - 1``; at 160x224 that allows a kernel of
    9 (not the usual 11), at 80x112 a kernel of 5. The Gaussian sigma shrinks with the kernel
    (1.5 at 11). Raises ``ValueError`` for images too small for a 3-pixel kernel.
    """
    limit = min(image_size) // (len(MS_SSIM_WEIGHTS) - 1) ** 2
    kernel = min(max_kernel, limit if limit % 2 else limit - 1)
    if kernel < 3:
        raise ValueError(f"Images of size {tuple(image_size)} are too small for 5-scale MS-SSIM (need >= 48).")
    return {"kernel_size": kernel, "kernel_sigma": 1.5 * kernel / 11, "weights": MS_SSIM_WEIGHTS}


def build_ms_ssim(image_size: Sequence[int], spatial_dims: int = 2, reduction: str = "mean") -> MultiScaleSSIMMetric:
    """``MultiScaleSSIMMetric`` for images in [0, 1] of ``image_size``."""
    return MultiScaleSSIMMetric(
        spatial_dims=spatial_dims, data_range=1.0, reduction=reduction, **ms_ssim_settings(image_size)
    )


class MultiScaleSSIMHandler(IgniteMetricHandler):
    """Ignite metric: mean MS-SSIM between ``pred`` and ``label`` with settings valid for ``image_size``."""

    def __init__(
        self, image_size: Sequence[int], spatial_dims: int = 2, output_transform: Callable = lambda x: x
    ) -> None:
        super().__init__(
            metric_fn=build_ms_ssim(image_size, spatial_dims), output_transform=output_transform, save_details=False
        )


def pairwise_ms_ssim(images: torch.Tensor, max_pairs: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean and std of MS-SSIM over distinct pairs of ``images`` ``(N, C, H, W)``: lower = more diverse.

    The reference papers compare this on generated samples with the same on real images. At most
    ``max_pairs`` pairs, drawn without replacement with ``seed``.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError("Diversity MS-SSIM needs at least 2 images.")
    pairs = list(itertools.combinations(range(n), 2))
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in rng.choice(len(pairs), size=max_pairs, replace=False)]
    metric = build_ms_ssim(images.shape[2:], images.ndim - 2, reduction="none")
    values = []
    for start in range(0, len(pairs), 64):
        chunk = pairs[start : start + 64]
        a = images[[i for i, _ in chunk]]
        b = images[[j for _, j in chunk]]
        values.append(metric(a, b).flatten())
    scores = torch.cat(values)
    return float(scores.mean()), float(scores.std())
