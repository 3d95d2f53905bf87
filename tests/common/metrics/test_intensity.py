"""common.metrics.intensity: brain mask, in-mask histograms and intensity comparison of two slice sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.metrics.intensity import (
    brain_mask,
    compare_intensities,
    intensity_histograms,
    pooled_histogram,
    tissue_thresholds,
)

TISSUE_VALUES = (0.3, 0.6, 0.9)  # CSF-like outer ring, GM-like ring, WM-like core


def phantoms(n: int = 6, size: int = 48, noise: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``(n, 1, size, size)`` with a 3-tissue disk on a zero background, and their label maps (1, 2, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((n, 1, size, size), dtype=np.int64)
    for i in range(n):
        cy, cx = size / 2 + rng.uniform(-2, 2, size=2)
        radius = np.hypot(yy - cy, xx - cx)
        labels[i, 0] = np.select([radius < 8, radius < 14, radius < 20], [3, 2, 1], 0)
    values = np.array((0.0, *TISSUE_VALUES), dtype=np.float32)[labels]
    images = np.where(labels > 0, values + rng.normal(0, noise, labels.shape), 0.0)
    return np.clip(images, 0, 1).astype(np.float32), labels


def test_brain_mask_keeps_largest_component_and_fills_holes():
    images, labels = phantoms(n=3)
    images[0, 0, 22:26, 22:26] = 0.0  # a dark "ventricle" inside the brain
    images[1, 0, 1:3, 1:3] = 0.8  # a speck outside the brain
    mask = brain_mask(torch.from_numpy(images))
    assert mask.shape == images.shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, labels > 0)
    assert not brain_mask(np.zeros((2, 1, 8, 8), dtype=np.float32)).any()


def test_intensity_histograms_are_normalised_per_image_and_pooled():
    images, labels = phantoms(n=4)
    hist = intensity_histograms(images, bins=16)
    assert hist.shape == (4, 16)
    np.testing.assert_allclose(hist.sum(1), 1.0)
    pooled = pooled_histogram(images, bins=16)
    assert pooled.shape == (16,) and pooled.sum() == pytest.approx(1.0)
    # Explicit masks; the upper edge 1.0 falls in the last bin, 0.0 in the first.
    edge = np.zeros((1, 1, 2, 2), dtype=np.float32)
    edge[0, 0, 0] = 1.0
    np.testing.assert_allclose(intensity_histograms(edge, np.ones_like(edge), bins=4)[0], [0.5, 0, 0, 0.5])


def test_identical_sets_match_perfectly():
    images, _ = phantoms()
    result = compare_intensities(images, images.copy())
    assert result["histogram_intersection"] == pytest.approx(1.0)
    assert result["jensen_shannon_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert result["wasserstein_1"] == pytest.approx(0.0, abs=1e-12)
    assert result["ks_statistic"] == pytest.approx(0.0, abs=1e-12)
    for tissue in result["tissues"].values():
        assert tissue["abs_diff"] == pytest.approx(0.0, abs=1e-12)


def test_brightness_shift_gives_its_wasserstein_distance():
    real, labels = phantoms()
    masks = labels > 0
    # Darker by 0.1 inside the brain (no pixel reaches 0, so nothing is clipped): W1 = the shift.
    fake = np.where(masks, real - 0.1, 0.0).astype(np.float32)
    assert fake[masks].min() > 0
    result = compare_intensities(real, fake, real_masks=masks, fake_masks=masks)
    assert result["wasserstein_1"] == pytest.approx(0.1, abs=1e-5)
    assert result["mean_fake"] - result["mean_real"] == pytest.approx(-0.1, abs=1e-5)
    assert result["histogram_intersection"] < 0.5
    assert 0.3 < result["jensen_shannon_divergence"] <= 1.0
    assert result["ks_statistic"] > 0.5
    smaller = compare_intensities(real, np.where(masks, real - 0.02, 0.0).astype(np.float32), masks, masks)
    assert smaller["wasserstein_1"] == pytest.approx(0.02, abs=1e-5)
    assert smaller["histogram_intersection"] > result["histogram_intersection"]
    assert smaller["jensen_shannon_divergence"] < result["jensen_shannon_divergence"]


def test_background_does_not_change_results():
    real, labels = phantoms(seed=0)
    fake, _ = phantoms(seed=1, noise=0.04)
    reference = compare_intensities(real, fake)
    rng = np.random.default_rng(3)
    # Below the mask threshold: the default brain mask ignores it.
    faint = np.where(fake > 0, fake, rng.uniform(0, 0.04, fake.shape)).astype(np.float32)
    assert compare_intensities(real, faint) == reference
    # Anything with an explicit mask.
    masks = brain_mask(fake)
    bright = np.where(masks, fake, rng.uniform(0, 1, fake.shape)).astype(np.float32)
    assert compare_intensities(real, bright, fake_masks=masks) == reference


def test_tissue_means_of_three_classes_are_recovered():
    real, labels = phantoms(n=8, seed=0)
    fake, fake_labels = phantoms(n=8, seed=1)
    thresholds = tissue_thresholds(real)
    # Otsu puts each threshold in the empty gap between two classes (where exactly is immaterial).
    assert 0.35 < thresholds[0] < 0.55 and 0.65 < thresholds[1] < 0.85

    result = compare_intensities(real, fake, tissue_names=("csf", "gm", "wm"))
    assert result["tissue_method"] == "multiotsu_real"
    assert result["tissue_thresholds"] == pytest.approx(thresholds.tolist())
    fractions = np.bincount(labels[labels > 0])[1:] / (labels > 0).sum()
    for (name, tissue), value, fraction in zip(result["tissues"].items(), TISSUE_VALUES, fractions, strict=True):
        assert tissue["mean_real"] == pytest.approx(value, abs=0.005), name
        assert tissue["mean_fake"] == pytest.approx(value, abs=0.005), name
        assert tissue["abs_diff"] < 0.005
        assert tissue["fraction_real"] == pytest.approx(fraction, abs=1e-6)

    by_labels = compare_intensities(real, fake, real_labels=labels, fake_labels=fake_labels)
    assert by_labels["tissue_method"] == "labels"
    assert list(by_labels["tissues"]) == ["label_1", "label_2", "label_3"]
    by_nearest = compare_intensities(real, fake, real_labels=labels)
    assert by_nearest["tissue_method"] == "labels_nearest_real_mean"
    for result in (by_labels, by_nearest):
        means = [t["mean_fake"] for t in result["tissues"].values()]
        np.testing.assert_allclose(means, TISSUE_VALUES, atol=0.005)


def test_subsampling_is_deterministic_and_bounded():
    real, _ = phantoms(seed=0)
    fake, _ = phantoms(seed=1)
    first = compare_intensities(real, fake, max_samples=500, seed=7)
    assert first["num_samples_real"] == first["num_samples_fake"] == 500
    assert first["num_pixels_real"] > 500
    assert compare_intensities(real, fake, max_samples=500, seed=7) == first
    assert compare_intensities(real, fake, max_samples=500, seed=8)["wasserstein_1"] != first["wasserstein_1"]


def test_empty_masks_are_counted_or_rejected():
    real, _ = phantoms()
    fake = real.copy()
    fake[0] = 0.0
    assert compare_intensities(real, fake)["empty_masks_fake"] == 1
    with pytest.raises(ValueError, match="empty masks"):
        intensity_histograms(fake)
    with pytest.raises(ValueError, match="all empty"):
        compare_intensities(real, np.zeros_like(real))
    with pytest.raises(ValueError, match="all empty"):
        compare_intensities(real, real, fake_masks=np.zeros(real.shape, dtype=bool))


def test_inputs_are_validated():
    real, labels = phantoms(n=2)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        compare_intensities(real[:, 0], real)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        brain_mask(np.concatenate([real, real], axis=1))
    with pytest.raises(ValueError, match="must lie in"):
        compare_intensities(real, real * 2.0)
    with pytest.raises(ValueError, match="NaN"):
        compare_intensities(real, np.full_like(real, np.nan))
    with pytest.raises(ValueError, match="shape of the images"):
        compare_intensities(real, real, real_masks=labels[:, :, :-1] > 0)
    with pytest.raises(ValueError, match="differ in size"):
        compare_intensities(real, real[:, :, :-1])
    with pytest.raises(ValueError, match="needs `real_labels`"):
        compare_intensities(real, real, fake_labels=labels)
    with pytest.raises(ValueError, match="tissue_names"):
        compare_intensities(real, real, tissue_names=("a", "b"))
    with pytest.raises(ValueError, match="bins"):
        intensity_histograms(real, bins=1)
    with pytest.raises(ValueError, match="tissue classes"):
        tissue_thresholds(np.full_like(real, 0.5))
