"""common.metrics.texture: masked GLCM features and the comparison of two feature sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.metrics.texture import GLCM_PROPERTIES, compare_texture, glcm_feature_names, glcm_features


def textured(n: int = 4, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed noise in a disk on a zero background ``(n, 1, size, size)``, and the disk masks."""
    rng = np.random.default_rng(seed)
    noise = rng.random((n, 1, size + 1, size + 1))
    smooth = (noise[..., 1:, 1:] + noise[..., :-1, 1:] + noise[..., 1:, :-1] + noise[..., :-1, :-1]) / 4
    yy, xx = np.mgrid[:size, :size]
    masks = np.broadcast_to(np.hypot(yy - size / 2, xx - size / 2) < size / 3, smooth.shape)
    return np.where(masks, smooth, 0.0).astype(np.float32), masks.copy()


def features_by_name(images, **kwargs) -> dict[str, np.ndarray]:
    distances = kwargs.get("distances", (1, 2))
    return dict(zip(glcm_feature_names(distances), glcm_features(images, **kwargs).T, strict=True))


def test_feature_names_and_order_are_stable():
    assert GLCM_PROPERTIES == ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
    assert glcm_feature_names() == [
        "contrast_d1",
        "contrast_d2",
        "homogeneity_d1",
        "homogeneity_d2",
        "energy_d1",
        "energy_d2",
        "correlation_d1",
        "correlation_d2",
        "dissimilarity_d1",
        "dissimilarity_d2",
    ]
    images, _ = textured(n=3)
    features = glcm_features(torch.from_numpy(images), distances=(1, 2, 3))
    assert features.shape == (3, len(glcm_feature_names((1, 2, 3)))) and features.dtype == np.float64


def test_constant_image_has_no_contrast():
    features = features_by_name(np.full((2, 1, 16, 16), 0.4, dtype=np.float32))
    for d in (1, 2):
        np.testing.assert_allclose(features[f"contrast_d{d}"], 0.0)
        np.testing.assert_allclose(features[f"dissimilarity_d{d}"], 0.0)
        np.testing.assert_allclose(features[f"homogeneity_d{d}"], 1.0)
        np.testing.assert_allclose(features[f"energy_d{d}"], 1.0)


def test_checkerboard_has_maximal_contrast_at_distance_one():
    levels = 8
    board = (np.indices((16, 16)).sum(0) % 2).astype(np.float32)[None, None]
    features = features_by_name(board, levels=levels, angles=(0.0,))
    assert features["contrast_d1"][0] == pytest.approx((levels - 1) ** 2)
    assert features["dissimilarity_d1"][0] == pytest.approx(levels - 1)
    assert features["homogeneity_d1"][0] == pytest.approx(1 / (1 + (levels - 1) ** 2))
    assert features["correlation_d1"][0] == pytest.approx(-1.0)
    assert features["contrast_d2"][0] == pytest.approx(0.0)
    images, _ = textured()
    assert (features_by_name(images, levels=levels, angles=(0.0,))["contrast_d1"] < (levels - 1) ** 2).all()


def test_masked_background_does_not_change_features():
    images, masks = textured()
    reference = glcm_features(images, masks)
    rng = np.random.default_rng(1)
    noisy = np.where(masks, images, rng.random(images.shape)).astype(np.float32)
    np.testing.assert_array_equal(glcm_features(noisy, masks), reference)
    assert not np.allclose(glcm_features(noisy), glcm_features(images))
    # A full mask gives exactly the unmasked features.
    np.testing.assert_allclose(glcm_features(images, np.ones_like(masks)), glcm_features(images), atol=1e-12)


def test_compare_texture_of_identical_sets_is_zero():
    images, masks = textured(n=12)
    features = glcm_features(images, masks)
    names = glcm_feature_names()
    result = compare_texture(features, features.copy(), names)
    assert list(result["features"]) == names
    for stats in result["features"].values():
        assert stats["standardised_mean_difference"] == 0.0
        assert stats["wasserstein_1"] == pytest.approx(0.0, abs=1e-12)
        assert stats["ks_statistic"] == 0.0
        assert stats["mean_real"] == stats["mean_fake"] and stats["std_real"] == stats["std_fake"]
        assert all(type(value) is float for value in stats.values())
    assert result["frechet_distance"] == pytest.approx(0.0, abs=1e-6)


def test_compare_texture_detects_a_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 3))
    fake = rng.normal(size=(200, 3)) + np.array([0.0, 1.0, 0.0])
    result = compare_texture(real, fake)
    shifted, same = result["features"]["feature_1"], result["features"]["feature_0"]
    assert shifted["standardised_mean_difference"] == pytest.approx(1.0, abs=0.2)
    assert shifted["wasserstein_1"] == pytest.approx(1.0, abs=0.2)
    assert shifted["ks_statistic"] > same["ks_statistic"]
    assert abs(same["standardised_mean_difference"]) < 0.3
    assert result["frechet_distance"] == pytest.approx(1.0, abs=0.4)
    # One feature: 1-D Frechet distance, in units of the real standard deviation.
    one = compare_texture(real[:, :1], real[:, :1] + 2.0)
    assert one["frechet_distance"] == pytest.approx((2.0 / one["features"]["feature_0"]["std_real"]) ** 2)


def test_inputs_are_validated():
    images, masks = textured(n=2)
    with pytest.raises(ValueError, match="empty masks"):
        glcm_features(images, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no pair"):
        single = np.zeros_like(masks)
        single[:, :, 5, 5] = True
        glcm_features(images, single)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        glcm_features(images[:, 0])
    with pytest.raises(ValueError, match="must lie in"):
        glcm_features(images - 0.5)
    with pytest.raises(ValueError, match="levels"):
        glcm_features(images, levels=1)
    with pytest.raises(ValueError, match="distances"):
        glcm_features(images, distances=(0,))
    features = glcm_features(images)
    with pytest.raises(ValueError, match="at least 2"):
        compare_texture(features[:1], features)
    with pytest.raises(ValueError, match="width"):
        compare_texture(features, features[:, :3])
    with pytest.raises(ValueError, match="feature_names"):
        compare_texture(features, features, ["a"])
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        compare_texture(features[0], features)
