"""Gray-level co-occurrence (GLCM) texture of real and generated slices.

``glcm_features`` turns slices ``(N, 1, H, W)`` in [0, 1] into Haralick-style features ``(N, F)`` with
scikit-image's ``graycomatrix`` / ``graycoprops``, optionally inside a mask; ``compare_texture`` compares
the feature distributions of two sets feature by feature and jointly (Frechet distance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import ks_2samp, wasserstein_distance
from skimage.feature import graycomatrix, graycoprops

from common.metrics.fid import frechet_distance
from common.metrics.intensity import ArrayLike, as_image_array, as_mask_array

# Feature order: every property for every distance, property-major (see ``glcm_feature_names``).
GLCM_PROPERTIES = ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


def glcm_feature_names(distances: Sequence[int] = (1, 2)) -> list[str]:
    """Names of the columns of ``glcm_features``: ``<property>_d<distance>``, property-major.

    With the default distances: ``contrast_d1, contrast_d2, homogeneity_d1, homogeneity_d2, energy_d1,
    energy_d2, correlation_d1, correlation_d2, dissimilarity_d1, dissimilarity_d2``.
    """
    return [f"{prop}_d{int(d)}" for prop in GLCM_PROPERTIES for d in distances]


def quantise(images: np.ndarray, levels: int, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Gray levels ``0 .. levels - 1`` (uint8) of ``images``: ``levels`` equal bins over the fixed ``value_range``.

    The range is fixed, not per image, so that the same intensity has the same level in real and
    generated slices.
    """
    lo, hi = value_range
    return np.clip(np.floor((images - lo) / (hi - lo) * levels), 0, levels - 1).astype(np.uint8)


def glcm_features(
    images: ArrayLike,
    masks: ArrayLike | None = None,
    levels: int = 32,
    distances: Sequence[int] = (1, 2),
    angles: Sequence[float] = GLCM_ANGLES,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """GLCM features ``(N, len(GLCM_PROPERTIES) * len(distances))`` float64 of slices ``(N, 1, H, W)``.

    Each slice is quantised to ``levels`` gray levels (``quantise``); its symmetric co-occurrence matrix is
    counted for every distance and angle (``skimage.feature.graycomatrix``), normalised, and
    ``skimage.feature.graycoprops`` gives each property of ``GLCM_PROPERTIES``, averaged over ``angles`` for
    each distance. Columns are named by ``glcm_feature_names(distances)``. ``correlation`` is 1 for a
    slice without gray-level variation (scikit-image's convention).

    Masked texture (``masks`` ``(N, 1, H, W)``, non-zero = inside; ``None`` = whole slice; pass
    ``common.metrics.intensity.brain_mask(images)`` for in-brain texture): in-mask pixels are quantised
    to levels ``1 .. levels`` and the rest set to level 0; the co-occurrence matrix over ``levels + 1``
    levels then has row and column 0 zeroed (every pair touching a pixel outside the mask is dropped)
    before it is normalised. Only pairs of in-mask pixels count, so the background and the brain outline
    do not change the features, and a full mask gives the unmasked features exactly (properties depend
    on level differences, or are shift-invariant).

    Raises ``ValueError`` for an empty mask, or a mask without any pair of in-mask pixels at one of the
    distances and angles.
    """
    array = as_image_array(images, "images", value_range)
    if not 2 <= levels <= 255:
        raise ValueError(f"`levels` must be in [2, 255], got {levels}.")
    distances = [int(d) for d in distances]
    angles = [float(a) for a in angles]
    if not distances or min(distances) < 1:
        raise ValueError(f"`distances` must be positive integers, got {distances}.")
    if not angles:
        raise ValueError("`angles` must not be empty.")
    gray = quantise(array[:, 0], levels, value_range)
    if masks is not None:
        mask = as_mask_array(masks, array.shape, "masks")[:, 0]
        empty = np.flatnonzero(~mask.reshape(mask.shape[0], -1).any(1))
        if empty.size:
            raise ValueError(f"Images {empty.tolist()} have empty masks: no texture to measure.")
        gray = np.where(mask, gray + 1, 0).astype(np.uint8)
    total_levels = levels + 1 if masks is not None else levels
    features = np.empty((array.shape[0], len(GLCM_PROPERTIES), len(distances)), dtype=np.float64)
    for i, image in enumerate(gray):
        matrix = graycomatrix(image, distances, angles, levels=total_levels, symmetric=True, normed=False)
        matrix = matrix.astype(np.float64)
        if masks is not None:
            matrix = matrix[1:, 1:]  # drop the pairs that involve a pixel outside the mask
        pairs = matrix.sum(axis=(0, 1))
        if (pairs == 0).any():
            raise ValueError(
                f"Image {i}: its mask has no pair of pixels at some of distances {distances} and angles {angles}."
            )
        matrix /= pairs
        for p, prop in enumerate(GLCM_PROPERTIES):
            features[i, p] = graycoprops(matrix, prop).mean(axis=1)
    return features.reshape(array.shape[0], -1)


def _feature_array(features: ArrayLike, name: str) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"`{name}` must have shape (N, F), got {tuple(array.shape)}.")
    if array.shape[0] < 2:
        raise ValueError(f"`{name}` needs at least 2 feature vectors, got {array.shape[0]}.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return array.astype(np.float64)


def compare_texture(
    real_features: ArrayLike, fake_features: ArrayLike, feature_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Texture-feature distributions of generated slices against real ones, as plain floats.

    ``real_features`` ``(N, F)`` and ``fake_features`` ``(M, F)``, e.g. from ``glcm_features`` with
    ``feature_names=glcm_feature_names(distances)`` (default names ``feature_<i>``). Returns
    ``{"features": {name: stats}, "frechet_distance": float}`` where ``stats`` holds:

    * ``mean_real``, ``std_real``, ``mean_fake``, ``std_fake`` (standard deviations with ``ddof=1``);
    * ``standardised_mean_difference``: ``(mean_fake - mean_real) / sqrt((std_real**2 + std_fake**2) / 2)``
      (Cohen's d, signed; 0 when both means are equal, +-inf when they differ without any spread);
    * ``wasserstein_1``: between the two sets' values of the feature, in the feature's units;
    * ``ks_statistic`` and ``ks_pvalue``: two-sample Kolmogorov-Smirnov test.

    ``frechet_distance`` is the Frechet distance (``common.metrics.fid.frechet_distance``, MONAI's
    ``FIDMetric``) of the two feature sets after standardising every feature with the REAL set's mean and
    standard deviation, so that features of different scales (contrast in squared levels, energy below 1)
    weigh alike; a feature constant in the real set is only centred.
    """
    real = _feature_array(real_features, "real_features")
    fake = _feature_array(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"Feature sets differ in width: {real.shape[1]} vs {fake.shape[1]}.")
    names = [f"feature_{i}" for i in range(real.shape[1])] if feature_names is None else list(feature_names)
    if len(names) != real.shape[1]:
        raise ValueError(f"`feature_names` must name {real.shape[1]} features, got {len(names)}.")
    mean_real, mean_fake = real.mean(0), fake.mean(0)
    std_real, std_fake = real.std(0, ddof=1), fake.std(0, ddof=1)
    pooled = np.sqrt((std_real**2 + std_fake**2) / 2)
    diff = mean_fake - mean_real
    with np.errstate(divide="ignore", invalid="ignore"):
        smd = np.where(diff == 0, 0.0, diff / pooled)
    ks = ks_2samp(real, fake, axis=0)
    per_feature = {
        name: {
            "mean_real": float(mean_real[i]),
            "std_real": float(std_real[i]),
            "mean_fake": float(mean_fake[i]),
            "std_fake": float(std_fake[i]),
            "standardised_mean_difference": float(smd[i]),
            "wasserstein_1": float(wasserstein_distance(real[:, i], fake[:, i])),
            "ks_statistic": float(ks.statistic[i]),
            "ks_pvalue": float(ks.pvalue[i]),
        }
        for i, name in enumerate(names)
    }
    scale = np.where(std_real > 0, std_real, 1.0)
    real_z, fake_z = (real - mean_real) / scale, (fake - mean_real) / scale
    if real.shape[1] == 1:  # MONAI's FIDMetric needs 2 features; 1-D: (mu_1 - mu_2)^2 + (sigma_1 - sigma_2)^2
        fd = (fake_z.mean() - real_z.mean()) ** 2 + (fake_z.std(ddof=1) - real_z.std(ddof=1)) ** 2
    else:
        fd = frechet_distance(torch.from_numpy(real_z), torch.from_numpy(fake_z))
    return {"features": per_feature, "frechet_distance": float(fd)}
