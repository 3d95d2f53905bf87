"""common.metrics.ms_ssim: settings valid for the image size, fidelity and diversity MS-SSIM."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from common.metrics.ms_ssim import (
    MS_SSIM_WEIGHTS,
    MultiScaleSSIMHandler,
    build_ms_ssim,
    ms_ssim_settings,
    pairwise_ms_ssim,
)

SIZE = (64, 64)  # small, still valid for 5-scale MS-SSIM (kernel 3)


def _smooth_images(n: int, size=SIZE, seed: int = 0) -> torch.Tensor:
    """Blurry random images in [0, 1] (structure at several scales, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, size[0] // 8, size[1] // 8), generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    ("size", "kernel"), [((80, 112), 5), ((160, 224), 9), ((512, 512), 11), ((64, 64), 3), ((96, 96), 5)]
)
def test_ms_ssim_settings_kernel(size, kernel):
    settings = ms_ssim_settings(size)
    assert settings["kernel_size"] == kernel
    assert settings["kernel_size"] % 2 == 1
    assert settings["kernel_sigma"] == pytest.approx(1.5 * kernel / 11)
    assert settings["weights"] == MS_SSIM_WEIGHTS
    assert sum(MS_SSIM_WEIGHTS) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("size", [(47, 47), (40, 200), (16, 16)])
def test_ms_ssim_settings_too_small(size):
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings(size)


def test_too_small_message_states_the_real_minimum():
    ms_ssim_settings((48, 48))  # accepted: 48 // 16 = 3 > kernel_size - 1 = 2
    with pytest.raises(ValueError, match=">= 48"):
        ms_ssim_settings((47, 47))


@pytest.mark.parametrize("size", [(48, 48), (64, 64), (80, 112)])
def test_settings_are_accepted_by_monai(size):
    """The point of the settings: MONAI's metric runs at this size instead of raising."""
    images = _smooth_images(2, size)
    metric = build_ms_ssim(size)
    values = metric(images, images)
    assert values.flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert metric.aggregate().item() == pytest.approx(1.0, abs=1e-4)


def test_identical_images_score_one_and_different_images_less():
    a, b = _smooth_images(2, seed=0), _smooth_images(2, seed=1)
    metric = build_ms_ssim(SIZE, reduction="none")
    assert metric(a, a).flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert (metric(a, b).flatten() < 0.9).all()


def test_pairwise_ms_ssim_measures_diversity():
    base = _smooth_images(1)
    g = torch.Generator().manual_seed(5)
    near_identical = (base + 0.01 * torch.randn((4, 1, *SIZE), generator=g)).clamp(0, 1)
    noise = torch.rand((4, 1, *SIZE), generator=g)
    similar_mean, similar_std = pairwise_ms_ssim(near_identical)
    diverse_mean, diverse_std = pairwise_ms_ssim(noise)
    assert isinstance(similar_mean, float) and isinstance(similar_std, float)
    assert similar_mean > 0.9
    assert diverse_mean < similar_mean - 0.3
    # the spread is that of the 6 pair scores, each MONAI's MS-SSIM of one pair
    metric = build_ms_ssim(SIZE, reduction="none")
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    scores = torch.cat([metric(noise[[i]], noise[[j]]).flatten() for i, j in pairs])
    assert diverse_mean == pytest.approx(float(scores.mean()), abs=1e-6)
    assert diverse_std == pytest.approx(float(scores.std()), abs=1e-6) and diverse_std > 0


def test_pairwise_ms_ssim_subsamples_pairs_reproducibly():
    images = _smooth_images(5)  # 10 pairs
    all_pairs = pairwise_ms_ssim(images)
    a = pairwise_ms_ssim(images, max_pairs=3, seed=1)
    b = pairwise_ms_ssim(images, max_pairs=3, seed=1)
    assert a == b
    assert pairwise_ms_ssim(images, max_pairs=10) == pytest.approx(all_pairs)


def test_pairwise_ms_ssim_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_ms_ssim(_smooth_images(1))


def test_ms_ssim_handler_in_an_engine():
    images = _smooth_images(2)
    engine = Engine(lambda engine, batch: batch)
    MultiScaleSSIMHandler(SIZE, output_transform=lambda out: (out["pred"], out["label"])).attach(engine, "ms_ssim")
    state = engine.run([{"pred": images, "label": images}, {"pred": images, "label": images.flip(-1)}])
    flipped = build_ms_ssim(SIZE)(images, images.flip(-1)).flatten()
    assert (flipped < 0.99).all()
    expected = (2 * 1.0 + flipped.sum().item()) / 4  # mean over the 4 image pairs
    assert state.metrics["ms_ssim"] == pytest.approx(expected, abs=1e-4)
