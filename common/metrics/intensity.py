"""Gray-level distributions of real and generated slices inside a brain mask.

Compares the in-brain intensities of two image sets ``(N, 1, H, W)`` in [0, 1] (torch tensors or numpy
arrays, on the CPU): histogram intersection and Jensen-Shannon divergence of the pooled histograms,
Wasserstein-1 distance and Kolmogorov-Smirnov statistic of the pooled pixel intensities, and mean
intensity per tissue class (classes from multi-Otsu thresholds of the real set, or from label maps).
Everything is vectorised over pixels; only connected-component labelling works image by image
(inside ``scipy.ndimage``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance
from skimage.filters import threshold_multiotsu

ArrayLike = torch.Tensor | np.ndarray

# Values this far outside ``value_range`` (interpolation overshoot) are clipped; further out is an error.
RANGE_TOLERANCE = 1e-4


def as_image_array(
    images: ArrayLike, name: str = "images", value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """``images`` ``(N, 1, H, W)`` as a float32 numpy array clipped to ``value_range``.

    Raises ``ValueError`` for another shape, an empty set, non-finite values or values outside
    ``value_range`` by more than ``RANGE_TOLERANCE``.
    """
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"`{name}` must have shape (N, 1, H, W), got {tuple(array.shape)}.")
    if array.size == 0:
        raise ValueError(f"`{name}` is empty: {tuple(array.shape)}.")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"`{name}` must be numeric, got dtype {array.dtype}.")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    lo, hi = value_range
    if not lo < hi:
        raise ValueError(f"`value_range` must be increasing, got {value_range}.")
    vmin, vmax = float(array.min()), float(array.max())
    if vmin < lo - RANGE_TOLERANCE or vmax > hi + RANGE_TOLERANCE:
        raise ValueError(f"`{name}` must lie in {value_range}, got values in [{vmin:.4g}, {vmax:.4g}].")
    return np.clip(array, lo, hi)


def as_mask_array(masks: ArrayLike, shape: tuple[int, ...], name: str = "masks") -> np.ndarray:
    """``masks`` as a boolean numpy array of ``shape`` (non-zero = inside); ``ValueError`` on another shape."""
    array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have the shape of the images {tuple(shape)}, got {tuple(array.shape)}.")
    return array != 0


def brain_mask(
    images: ArrayLike, threshold: float = 0.05, largest_component: bool = True, fill_holes: bool = True
) -> np.ndarray:
    """Foreground mask ``(N, 1, H, W)`` bool of slices ``(N, 1, H, W)`` in [0, 1].

    Pixels above ``threshold``, then (per slice, 8-connected) only the largest connected component (ties
    keep all of the largest), then holes filled (dark ventricles or sulci enclosed by the brain are
    inside). This is only meant for data whose background is zero or near zero, such as the
    skull-stripped, min-max scaled MRI slices and the brain phantoms of this repository; pass an
    explicit mask to the comparison functions for anything else. A slice with nothing above
    ``threshold`` gets an empty mask.
    """
    array = as_image_array(images)
    foreground = array[:, 0] > threshold
    # Connectivity only within a slice: a 3-D structuring element whose neighbours lie in the same plane.
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 2)
    if largest_component:
        labels, count = ndimage.label(foreground, structure=in_plane)
        if count:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            size_map = sizes[labels]  # component size at each pixel, 0 in the background
            largest = size_map.reshape(size_map.shape[0], -1).max(axis=1)
            foreground = (size_map == largest[:, None, None]) & (size_map > 0)
    if fill_holes:
        foreground = ndimage.binary_fill_holes(foreground, structure=in_plane)
    return foreground[:, None]


def _resolve_masks(array: np.ndarray, masks: ArrayLike | None, name: str, threshold: float = 0.05) -> np.ndarray:
    return brain_mask(array, threshold) if masks is None else as_mask_array(masks, array.shape, name)


def _bin_index(values: np.ndarray, bins: int, value_range: tuple[float, float]) -> np.ndarray:
    """Histogram bin of each value: ``bins`` equal bins over ``value_range``, the upper edge in the last bin."""
    lo, hi = value_range
    return np.clip(np.floor((values - lo) / (hi - lo) * bins), 0, bins - 1).astype(np.int64)


def _histogram_counts(
    array: np.ndarray, masks: np.ndarray, bins: int, value_range: tuple[float, float], name: str
) -> np.ndarray:
    """In-mask pixel counts per image and bin ``(N, bins)``; ``ValueError`` if no mask has a pixel."""
    if bins < 2:
        raise ValueError(f"`bins` must be at least 2, got {bins}.")
    image_index = np.nonzero(masks)[0]
    if image_index.size == 0:
        raise ValueError(f"The masks of `{name}` are all empty: no pixel to compare.")
    flat = image_index * bins + _bin_index(array[masks], bins, value_range)
    return np.bincount(flat, minlength=array.shape[0] * bins).reshape(array.shape[0], bins)


def intensity_histograms(
    images: ArrayLike,
    masks: ArrayLike | None = None,
    bins: int = 64,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Per-image in-mask intensity histograms ``(N, bins)``, each summing to 1.

    ``bins`` equal-width bins over ``value_range`` (edges ``np.linspace(*value_range, bins + 1)``, the upper
    edge in the last bin). ``masks`` ``(N, 1, H, W)`` (non-zero = inside) defaults to ``brain_mask(images)``.
    Raises ``ValueError`` if any image has an empty mask (its histogram would be undefined).
    """
    array = as_image_array(images, "images", value_range)
    mask = _resolve_masks(array, masks, "masks")
    counts = _histogram_counts(array, mask, bins, value_range, "images")
    totals = counts.sum(axis=1, keepdims=True)
    if (totals == 0).any():
        raise ValueError(f"Images {np.flatnonzero(totals[:, 0] == 0).tolist()} have empty masks.")
    return counts / totals


def pooled_histogram(
    images: ArrayLike,
    masks: ArrayLike | None = None,
    bins: int = 64,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Histogram ``(bins,)`` of all in-mask pixels of a set, summing to 1 (bins as ``intensity_histograms``).

    Pixels are pooled, so larger brains weigh more; images with an empty mask contribute nothing. Raises
    ``ValueError`` if every mask is empty.
    """
    array = as_image_array(images, "images", value_range)
    counts = _histogram_counts(array, _resolve_masks(array, masks, "masks"), bins, value_range, "images").sum(0)
    return counts / counts.sum()


def _subsample(values: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """At most ``max_samples`` of ``values``, drawn without replacement with ``seed`` (in their original order)."""
    if values.size <= max_samples:
        return values
    keep = np.random.default_rng(seed).choice(values.size, size=max_samples, replace=False)
    return values[np.sort(keep)]


def _multiotsu(samples: np.ndarray, classes: int) -> np.ndarray:
    try:
        return np.asarray(threshold_multiotsu(samples, classes=classes), dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"Cannot split the in-mask intensities into {classes} tissue classes: {error}") from error


def tissue_thresholds(
    images: ArrayLike,
    masks: ArrayLike | None = None,
    classes: int = 3,
    max_samples: int = 200_000,
    seed: int = 0,
) -> np.ndarray:
    """Intensity thresholds ``(classes - 1,)`` that split the in-mask pixels of a set into tissue classes.

    Multi-Otsu (``skimage.filters.threshold_multiotsu``, 256 bins over the data range) on the pooled in-mask
    intensities, of which at most ``max_samples`` are drawn without replacement with ``seed``. On T1-weighted
    slices the 3 classes, darkest first, are roughly CSF, grey matter and white matter. Pixel ``x`` belongs
    to class ``np.digitize(x, thresholds)``.
    """
    array = as_image_array(images)
    values = array[_resolve_masks(array, masks, "masks")]
    if values.size == 0:
        raise ValueError("The masks of `images` are all empty: no pixel to threshold.")
    if classes < 2:
        raise ValueError(f"`classes` must be at least 2, got {classes}.")
    return _multiotsu(_subsample(values, max_samples, seed).astype(np.float64), classes)


def _class_stats(values: np.ndarray, classes: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity (NaN for an empty class) and pixel fraction of each of ``count`` classes."""
    sizes = np.bincount(classes, minlength=count)[:count].astype(np.float64)
    sums = np.bincount(classes, weights=values, minlength=count)[:count]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(sizes > 0, sums / sizes, np.nan)
    return means, sizes / max(sizes.sum(), 1.0)


def _jensen_shannon_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """JS divergence (base 2) of two histograms; rounding can leave a tiny negative under scipy's square root."""
    with np.errstate(invalid="ignore"):
        distance = jensenshannon(p, q, base=2)
    return float(np.nan_to_num(distance, nan=0.0) ** 2)


def _tissue_names(tissue_names: Sequence[str] | None, default: list[str]) -> list[str]:
    if tissue_names is None:
        return default
    if len(tissue_names) != len(default):
        raise ValueError(f"`tissue_names` must name {len(default)} tissues, got {list(tissue_names)}.")
    return list(tissue_names)


def compare_intensities(
    real: ArrayLike,
    fake: ArrayLike,
    real_masks: ArrayLike | None = None,
    fake_masks: ArrayLike | None = None,
    bins: int = 64,
    value_range: tuple[float, float] = (0.0, 1.0),
    tissue_classes: int = 3,
    real_labels: ArrayLike | None = None,
    fake_labels: ArrayLike | None = None,
    tissue_names: Sequence[str] | None = None,
    max_samples: int = 200_000,
    seed: int = 0,
    threshold: float = 0.05,
) -> dict[str, Any]:
    """In-brain gray-level distribution of generated slices ``fake`` against real slices ``real``.

    Both sets are ``(N, 1, H, W)`` / ``(M, 1, H, W)`` in ``value_range`` (sizes may differ). Masks (non-zero =
    inside) default to ``labels > 0`` when label maps are given, else to ``brain_mask(images, threshold)``.
    Pixels of all in-mask images are pooled per set (images with an empty mask contribute nothing and are
    counted in ``empty_masks_*``; a set whose masks are all empty raises ``ValueError``).

    Returned (JSON-serialisable, plain floats/ints/strings):

    * ``histogram_intersection``: sum of bin-wise minima of the two pooled histograms (``bins`` bins over
      ``value_range``), 1 = identical, 0 = disjoint;
    * ``jensen_shannon_divergence``: of the same histograms, base 2, in [0, 1] (0 = identical); the square of
      ``scipy.spatial.distance.jensenshannon``;
    * ``wasserstein_1``: earth mover's distance between the pooled in-mask intensities, in intensity units
      (a uniform shift by ``s`` gives ``s``);
    * ``ks_statistic`` and ``ks_pvalue``: two-sample Kolmogorov-Smirnov test of the same intensities. The
      p-value treats pixels as independent, which they are not, and shrinks with the number of pixels:
      read it as a descriptive figure, not a test;
    * ``mean_*``, ``std_*``: of all in-mask pixels; ``num_pixels_*``: in-mask pixels;
      ``num_samples_*``: pixels used for Wasserstein-1, KS and the thresholds;
    * ``tissue_method``, ``tissue_thresholds`` and ``tissues``: ``{name: {mean_real, mean_fake, abs_diff,
      fraction_real, fraction_fake}}``, the mean intensity and share of in-mask pixels of each tissue class
      (NaN for a class with no pixel in a set).

    Tissue classes:

    * no labels (``tissue_method="multiotsu_real"``): ``tissue_classes`` classes split by the multi-Otsu
      thresholds of the REAL set (``tissue_thresholds``), applied to both sets; names default to
      ``class_0`` (darkest) ... Fixed thresholds bound each fake class mean to the real class's intensity
      interval, so a global brightness change shows mostly in the class fractions and in Wasserstein-1;
    * ``real_labels`` and ``fake_labels`` (``"labels"``): integer maps ``(N, 1, H, W)``, 0 = no tissue, one
      class per positive label present in the real masks (e.g. the phantoms' CSF / GM / WM), names default
      to ``label_<value>`` (fake pixels with a label absent from the real set are left out);
    * ``real_labels`` only (``"labels_nearest_real_mean"``): real classes from the labels; each fake pixel
      goes to the class whose real mean intensity is nearest (thresholds at the midpoints between sorted
      real class means, reported in ``tissue_thresholds``).

    Sampling: histograms, means and tissue statistics use every in-mask pixel. Wasserstein-1, KS and the
    multi-Otsu thresholds use at most ``max_samples`` pixels per set, drawn without replacement with
    ``seed`` (the same generator for both sets, so equal-size sets are sampled at the same positions).
    """
    real_array = as_image_array(real, "real", value_range)
    fake_array = as_image_array(fake, "fake", value_range)
    if real_array.shape[2:] != fake_array.shape[2:]:
        raise ValueError(f"`real` and `fake` slices differ in size: {real_array.shape[2:]} vs {fake_array.shape[2:]}.")
    if fake_labels is not None and real_labels is None:
        raise ValueError("`fake_labels` needs `real_labels`: the tissue classes are defined on the real set.")
    if max_samples < 2:
        raise ValueError(f"`max_samples` must be at least 2, got {max_samples}.")
    if real_labels is None and tissue_classes < 2:
        raise ValueError(f"`tissue_classes` must be at least 2, got {tissue_classes}.")
    real_label_array = None if real_labels is None else _label_array(real_labels, real_array.shape, "real_labels")
    fake_label_array = None if fake_labels is None else _label_array(fake_labels, fake_array.shape, "fake_labels")
    if real_masks is None and real_label_array is not None:
        real_masks = real_label_array > 0
    if fake_masks is None and fake_label_array is not None:
        fake_masks = fake_label_array > 0
    real_mask = _resolve_masks(real_array, real_masks, "real_masks", threshold)
    fake_mask = _resolve_masks(fake_array, fake_masks, "fake_masks", threshold)

    real_hist = _histogram_counts(real_array, real_mask, bins, value_range, "real").sum(0)
    fake_hist = _histogram_counts(fake_array, fake_mask, bins, value_range, "fake").sum(0)
    real_hist, fake_hist = real_hist / real_hist.sum(), fake_hist / fake_hist.sum()
    real_values = real_array[real_mask].astype(np.float64)
    fake_values = fake_array[fake_mask].astype(np.float64)
    real_samples = _subsample(real_values, max_samples, seed)
    fake_samples = _subsample(fake_values, max_samples, seed)
    ks = ks_2samp(real_samples, fake_samples)

    result: dict[str, Any] = {
        "histogram_intersection": float(np.minimum(real_hist, fake_hist).sum()),
        "jensen_shannon_divergence": _jensen_shannon_divergence(real_hist, fake_hist),
        "wasserstein_1": float(wasserstein_distance(real_samples, fake_samples)),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "mean_real": float(real_values.mean()),
        "mean_fake": float(fake_values.mean()),
        "std_real": float(real_values.std()),
        "std_fake": float(fake_values.std()),
        "num_pixels_real": int(real_values.size),
        "num_pixels_fake": int(fake_values.size),
        "num_samples_real": int(real_samples.size),
        "num_samples_fake": int(fake_samples.size),
        "empty_masks_real": int((~real_mask.reshape(real_mask.shape[0], -1).any(1)).sum()),
        "empty_masks_fake": int((~fake_mask.reshape(fake_mask.shape[0], -1).any(1)).sum()),
        "bins": int(bins),
    }

    if real_label_array is None:
        thresholds = _multiotsu(real_samples, tissue_classes)
        names = _tissue_names(tissue_names, [f"class_{i}" for i in range(tissue_classes)])
        real_classes = np.digitize(real_values, thresholds)
        fake_classes = np.digitize(fake_values, thresholds)
        method = "multiotsu_real"
    else:
        real_tissue = real_label_array[real_mask]
        label_values = np.unique(real_tissue[real_tissue > 0])
        if label_values.size == 0:
            raise ValueError("`real_labels` has no positive label inside the real masks.")
        names = _tissue_names(tissue_names, [f"label_{int(v)}" for v in label_values])
        real_inside = real_tissue > 0
        real_values = real_values[real_inside]
        real_classes = np.searchsorted(label_values, real_tissue[real_inside])
        if fake_label_array is not None:
            fake_tissue = fake_label_array[fake_mask]
            known = np.isin(fake_tissue, label_values)
            fake_values = fake_values[known]
            fake_classes = np.searchsorted(label_values, fake_tissue[known])
            thresholds = np.empty(0)
            method = "labels"
        else:
            real_means, _ = _class_stats(real_values, real_classes, label_values.size)
            order = np.argsort(real_means)
            sorted_means = real_means[order]
            thresholds = (sorted_means[1:] + sorted_means[:-1]) / 2
            fake_classes = order[np.digitize(fake_values, thresholds)]
            method = "labels_nearest_real_mean"
    count = len(names)
    real_means, real_fractions = _class_stats(real_values, real_classes, count)
    fake_means, fake_fractions = _class_stats(fake_values, fake_classes, count)
    result["tissue_method"] = method
    result["tissue_thresholds"] = [float(t) for t in thresholds]
    result["tissues"] = {
        name: {
            "mean_real": float(real_means[i]),
            "mean_fake": float(fake_means[i]),
            "abs_diff": float(abs(fake_means[i] - real_means[i])),
            "fraction_real": float(real_fractions[i]),
            "fraction_fake": float(fake_fractions[i]),
        }
        for i, name in enumerate(names)
    }
    return result


def _label_array(labels: ArrayLike, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have the shape of the images {tuple(shape)}, got {tuple(array.shape)}.")
    if not (np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array))):
        raise ValueError(f"`{name}` must hold integer labels.")
    if (array < 0).any():
        raise ValueError(f"`{name}` must hold non-negative labels (0 = no tissue).")
    return array.astype(np.int64)
