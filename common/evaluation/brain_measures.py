"""Tissue fractions and ventricle size measured on a T1-weighted brain slice from the image alone.

Generated slices have no label maps, so condition adherence ("does the slice show the requested CSF fraction
and ventricle size?") needs a measurement that reads the image only. :func:`measure_slice` does it in five steps,
all on the in-brain pixels of one slice in [0, 1] (T1w contrast: CSF dark, grey matter mid, white matter bright):

1. **Brain mask**: :func:`common.metrics.intensity.brain_mask` (pixels above 0.05, largest component, holes
   filled).
2. **Bias field**: a smooth multiplicative field ``exp(q(x, y))``, ``q`` a quadratic polynomial of the in-plane
   position, fitted by least squares to ``log(intensity + c)`` of the grey- and white-matter pixels (multi-Otsu
   classes, one intercept per class; ``c`` = :data:`BIAS_OFFSET` accounts for the min-max scaling that puts CSF
   near 0), divided out; two rounds. The phantoms' bias field is the exponential of a quadratic polynomial, so
   this model fits it.
3. **Pure-tissue intensities**: a partial-volume ("mixel") mixture fitted to the in-brain histogram by maximum
   likelihood: three Gaussian pure classes (CSF, GM, WM) and two mixed classes (CSF/GM and GM/WM, uniform mixing
   fraction blurred by Gaussian noise), from two starts (the multi-Otsu class means, and the same with CSF at the
   1st percentile), keeping the likelier fit (the multi-Otsu means if both fail). Multi-Otsu alone puts the CSF/GM threshold where the histogram has its valley, which moves with the amount of
   CSF and biases every fraction; the fitted class means do not.
4. **Fractions**: each pixel is split linearly between its two neighbouring pure intensities (clipped to
   [0, 1]): ``csf = (mu_gm - x) / (mu_gm - mu_csf)``, ``wm = (x - mu_gm) / (mu_wm - mu_gm)``, ``gm`` the rest.
   The mean over the brain gives the *raw* fractions. They underestimate CSF (about 0.110 against 0.140): the
   phantoms' tissue maps are probabilistic, so "pure" grey matter still holds some CSF and the fitted GM
   intensity absorbs it. A linear map per tissue (:data:`FRACTION_CALIBRATION`, least squares of the true
   fraction on the raw one), then renormalisation to sum 1, gives the reported fractions. The map is fitted to
   the phantoms; ``calibrate=False`` keeps the raw fractions for other images.
5. **Ventricles**: pixels with a CSF share >= :data:`VENTRICLE_CSF_SHARE` and at least
   :data:`VENTRICLE_MIN_DEPTH_MM` from the brain edge (so sulci and the interhemispheric fissure, which reach the
   surface, drop out), 8-connected components whose centroid lies within :data:`VENTRICLE_CENTRAL_BOX` of the
   brain's extent from the brain's centroid; the ventricle area is the summed CSF share of those pixels times the
   pixel area (mm^2). :data:`VENTRICLE_VOLUME_FIT` maps it to an estimate of the subject's ventricle volume (ml).

No threshold is fixed in intensity: every slice gets its own class intensities, so the measurement follows a
generated slice whose contrast or brightness differs from the training data.

**Calibration and ceiling.** The constants were fitted on 100 phantom subjects with seed 0 (500 slices,
:meth:`~common.data.brain.phantoms.BrainPhantomGenerator.subject` of ``PhantomGeometry.demo(num_slices=5)``;
the per-slice area of the phantoms' ventricle map was used to choose the ventricle settings, which were stable
over CSF shares 0.4-0.6, depths 6-14 mm and either connectivity). The
ceiling, measured on a disjoint set (seed 1), is what :func:`measurement_ceiling` returns on the real slices::

    from common.data.brain.phantoms import write_phantom_dataset, PhantomGeometry
    path = write_phantom_dataset("/tmp/bm_ph_s1", num_subjects=100, geometry=PhantomGeometry.demo(num_slices=5),
                                 seed=1, progress=False)
    entries = [e for split in ("training", "validation", "test") for e in json.load(open(path))[split]]
    measurement_ceiling(entries, lambda e: nib.load(f"/tmp/bm_ph_s1/{e['image']}").get_fdata())

gives, over the 500 slices (true facts against measurements on the T1w images; about 0.1 s per slice):

================================  =========  ==========  ===============================
attribute                         Pearson r  Spearman r  MAE
================================  =========  ==========  ===============================
csf_fraction                      0.987                  0.0029
gm_fraction                       0.862                  0.0105
wm_fraction                       0.796                  0.0107
ventricle volume vs slice area    0.888      0.872       4.0 ml (estimated volume)
ventricle size word vs area                  0.827       (word accuracy 76 %)
================================  =========  ==========  ===============================

(the last row: the same slices with only the caption's size word as the request). Measured on seed 0, the
ventricle area is 1.006 times the true per-slice area of the phantoms' ventricle map on average (r = 0.985),
and that true area correlates r = 0.864 with the subject's volume: a slice sees part of the ventricles, so the
ventricle ceiling is mostly the slice's, not the measurement's. Grey and white matter are limited mostly by
white-matter hyperintensities, which the facts count as white matter but which look like grey matter in T1w
(r = 0.95 between the true GM fraction and GM + WMH). Raw fractions (before calibration) correlate the same for
CSF (0.986) and less for GM / WM (0.79 / 0.81); the raw CSF fraction averages 0.110 against a true 0.140.
These numbers are what an adherence score of generated slices can reach at best with this measurement.

**Alternatives measured** (Pearson r of CSF / GM / WM fractions on seed-0 phantoms): hard multi-Otsu classes per
image 0.70 / 0.60 / 0.67 (MAE about 0.017 each; the valley threshold moves with the CSF amount); fixed
intensity thresholds, best of a grid, 0.97 for CSF but at most 0.62 / 0.38 for GM / WM (grey-matter intensity
varies between subjects); hard classes at the midpoints of the fitted pure intensities 0.976 / 0.70 / 0.71,
and 0.986 / 0.82 / 0.81 after bias correction (with a larger raw CSF bias than the linear split's, -0.043
against -0.031).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage, optimize, stats
from scipy.special import ndtr
from skimage.filters import threshold_multiotsu

from common.data.brain.phantoms import ventricle_size_word
from common.metrics.intensity import as_image_array, brain_mask

__all__ = [
    "BIAS_OFFSET",
    "FRACTION_CALIBRATION",
    "TISSUES",
    "VENTRICLE_CENTRAL_BOX",
    "VENTRICLE_CSF_SHARE",
    "VENTRICLE_MIN_DEPTH_MM",
    "VENTRICLE_SIZE_RANK",
    "VENTRICLE_VOLUME_FIT",
    "SliceMeasures",
    "adherence_scores",
    "measure_slice",
    "measure_slices",
    "measurement_ceiling",
]

#: Tissue fractions measured, in the phantom datalists' key names.
TISSUES = ("csf_fraction", "gm_fraction", "wm_fraction")
#: Offset ``c`` added before the log in the bias-field fit (min-max scaling puts CSF near 0, not the signal's 0).
BIAS_OFFSET = 0.2
#: ``true ~ a + b * raw`` per tissue: least squares on 500 phantom slices (seed 0, see the module docstring).
FRACTION_CALIBRATION: dict[str, tuple[float, float]] = {
    "csf_fraction": (0.03249, 0.9816),
    "gm_fraction": (0.04827, 0.8546),
    "wm_fraction": (0.1600, 0.6079),
}
#: Smallest CSF share of a ventricle pixel.
VENTRICLE_CSF_SHARE = 0.5
#: Smallest distance (mm) of a ventricle pixel from the edge of the brain mask.
VENTRICLE_MIN_DEPTH_MM = 10.0
#: A ventricle component's centroid lies within this fraction of the brain's extent from the brain's centroid.
VENTRICLE_CENTRAL_BOX = 0.2
#: ``volume_ml ~ a + b * area_mm2``: least squares of the subject's ventricle volume on the slice's ventricle
#: area, 500 phantom slices (seed 0) through the bodies of the lateral ventricles (MNI z = 11-19 mm).
VENTRICLE_VOLUME_FIT: tuple[float, float] = (-1.860, 0.02765)
#: Ordinal of the caption's ventricle size words.
VENTRICLE_SIZE_RANK = {"small": 0, "medium": 1, "large": 2}

_MIN_BRAIN_PIXELS = 64  # fewer in-brain pixels than this: nothing is measured
_HIST_BINS = 96
_BIAS_ROUNDS = 2
_BIAS_FIELD_RANGE = (0.5, 2.0)  # the fitted field is clipped to this range (odd generated slices)


@dataclass(frozen=True)
class SliceMeasures:
    """What :func:`measure_slice` reads off one slice (NaN where the slice has too little brain to measure).

    Fractions are of the brain mask's area and sum to 1; ``raw_*`` are before :data:`FRACTION_CALIBRATION`.
    ``class_means`` are the fitted pure CSF / GM / WM intensities after bias correction.
    """

    csf_fraction: float
    gm_fraction: float
    wm_fraction: float
    ventricle_area_mm2: float
    brain_area_mm2: float
    ventricle_volume_ml_estimate: float
    raw_csf_fraction: float
    raw_gm_fraction: float
    raw_wm_fraction: float
    class_means: tuple[float, float, float]

    @property
    def ventricle_fraction(self) -> float:
        """Ventricle area over brain area (NaN for an empty brain)."""
        return self.ventricle_area_mm2 / self.brain_area_mm2 if self.brain_area_mm2 > 0 else math.nan

    @property
    def ventricle_size(self) -> str | None:
        """Caption word (small / medium / large) of the estimated ventricle volume; ``None`` if not measured."""
        v = self.ventricle_volume_ml_estimate
        return ventricle_size_word(v) if math.isfinite(v) else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_means"] = list(self.class_means)
        data["ventricle_fraction"] = self.ventricle_fraction
        data["ventricle_size"] = self.ventricle_size
        return data


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def _as_slice(image: Any) -> np.ndarray:
    """``(H, W)`` or ``(1, H, W)`` image (numpy or torch) in [0, 1] as a float64 ``(H, W)`` array."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"`image` must have shape (H, W) or (1, H, W), got {tuple(array.shape)}.")
    return as_image_array(array[None, None], "image")[0, 0].astype(np.float64)


def _spacing(spacing_mm: float | Sequence[float]) -> tuple[float, float]:
    values = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else tuple(spacing_mm)
    if len(values) != 2 or not all(math.isfinite(float(s)) and float(s) > 0 for s in values):
        raise ValueError(f"`spacing_mm` must be a positive number or two, got {spacing_mm!r}.")
    return float(values[0]), float(values[1])


def _otsu_classes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Multi-Otsu class (0, 1, 2) of each value and the class means; ``None`` if the values cannot be split."""
    try:
        thresholds = threshold_multiotsu(values, classes=3)
    except ValueError:
        return None
    classes = np.digitize(values, thresholds)
    if np.bincount(classes, minlength=3).min() == 0:
        return None
    means = np.array([values[classes == k].mean() for k in range(3)])
    return classes, means


def _correct_bias(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``values`` divided by a fitted smooth field (see the module docstring, step 2)."""
    r = (rows - rows.mean()) / max(np.ptp(rows) / 2.0, 1.0)
    c = (cols - cols.mean()) / max(np.ptp(cols) / 2.0, 1.0)
    basis = np.stack([r, c, r * r, c * c, r * c], axis=1)
    log_shifted = np.log(np.maximum(values + BIAS_OFFSET, 1e-3))
    field = np.ones_like(values)
    for _ in range(_BIAS_ROUNDS):
        split = _otsu_classes((values + BIAS_OFFSET) / field - BIAS_OFFSET)
        if split is None:
            break
        classes = split[0]
        fit = classes >= 1  # grey and white matter: CSF pixels are few and mostly partial-volume
        if fit.sum() < 10 * (basis.shape[1] + 2):
            break
        design = np.concatenate([basis, (classes == 1)[:, None], (classes == 2)[:, None]], axis=1).astype(np.float64)
        coef = np.linalg.lstsq(design[fit], log_shifted[fit], rcond=None)[0]
        field = np.clip(np.exp(basis @ coef[:5]), *_BIAS_FIELD_RANGE)
    return (values + BIAS_OFFSET) / field - BIAS_OFFSET


def _mixel_means(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Pure CSF / GM / WM intensities of a partial-volume mixture fitted to the histogram (step 3)."""
    lo, hi = min(0.0, float(values.min())), max(1.0, float(values.max()))
    counts, edges = np.histogram(values, bins=_HIST_BINS, range=(lo, hi))
    centres, width = (edges[:-1] + edges[1:]) / 2.0, edges[1] - edges[0]

    def unpack(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mu = np.cumsum(np.concatenate([p[:1], np.exp(p[1:3])]))
        sigma = np.exp(p[3:6])
        weights = np.exp(p[6:11] - p[6:11].max())
        return mu, sigma, weights / weights.sum()

    def nll(p: np.ndarray) -> float:
        mu, sigma, weights = unpack(p)
        pure = np.exp(-0.5 * ((centres[None] - mu[:, None]) / sigma[:, None]) ** 2) / (
            sigma[:, None] * math.sqrt(2 * math.pi)
        )
        mixed = []
        for k in range(2):
            s = (sigma[k] + sigma[k + 1]) / 2.0
            mixed.append((ndtr((centres - mu[k]) / s) - ndtr((centres - mu[k + 1]) / s)) / (mu[k + 1] - mu[k]))
        density = weights @ np.concatenate([pure, np.stack(mixed)]) * width
        return float(-(counts * np.log(density + 1e-12)).sum())

    bounds = [(lo - 0.2, hi)] + [(math.log(0.02), math.log(1.5))] * 2 + [(math.log(0.003), math.log(0.3))] * 3
    bounds += [(-12.0, 12.0)] * 5
    best_mu, best_nll = start, math.inf
    # Two starts: the multi-Otsu means, and the same with CSF at the darkest percentile (the Otsu CSF class is
    # mostly partial-volume pixels; from its mean alone the fit can settle on a CSF intensity far too bright).
    for csf_start in (start[0], min(float(np.percentile(values, 1.0)), start[0])):
        means = np.array([csf_start, start[1], start[2]])
        gaps = np.maximum(np.diff(means), 0.03)
        p0 = np.concatenate([means[:1], np.log(gaps), np.log([0.04, 0.04, 0.04]), np.log([0.1, 0.25, 0.3, 0.15, 0.2])])
        p0 = np.clip(p0, [b[0] for b in bounds], [b[1] for b in bounds])
        with np.errstate(all="ignore"):
            result = optimize.minimize(nll, p0, method="L-BFGS-B", bounds=bounds)
        mu = unpack(result.x)[0]
        if np.isfinite(result.fun) and result.fun < best_nll and np.all(np.isfinite(mu)):
            best_mu, best_nll = mu, float(result.fun)
    return best_mu


def _nan_measures(brain_area: float) -> SliceMeasures:
    nan = math.nan
    return SliceMeasures(nan, nan, nan, nan, brain_area, nan, nan, nan, nan, (nan, nan, nan))


def measure_slice(image: Any, spacing_mm: float | Sequence[float] = 2.0, calibrate: bool = True) -> SliceMeasures:
    """Tissue fractions and ventricle area of one T1w slice ``(H, W)`` or ``(1, H, W)`` in [0, 1].

    ``spacing_mm`` is the pixel size (one number, or the two array axes'); the phantom demo slices are 2 mm.
    ``calibrate=False`` reports the raw fractions (no :data:`FRACTION_CALIBRATION`), e.g. for images that are
    not phantom-like. A slice with fewer than 64 brain pixels, or whose intensities cannot be split into three
    classes, gets NaN measures (and a warning). Steps and their constants: module docstring.
    """
    x = _as_slice(image)
    sx, sy = _spacing(spacing_mm)
    pixel_area = sx * sy
    mask = brain_mask(x[None, None].astype(np.float32))[0, 0]
    brain_area = float(mask.sum()) * pixel_area
    if mask.sum() < _MIN_BRAIN_PIXELS:
        warnings.warn(f"measure_slice: only {int(mask.sum())} brain pixels, nothing measured.", stacklevel=2)
        return _nan_measures(brain_area)
    rows, cols = np.nonzero(mask)
    values = _correct_bias(x[mask], rows.astype(np.float64), cols.astype(np.float64))
    split = _otsu_classes(values)
    if split is None:
        warnings.warn("measure_slice: the brain's intensities cannot be split into 3 tissue classes.", stacklevel=2)
        return _nan_measures(brain_area)
    mu = _mixel_means(values, split[1])

    csf = np.clip((mu[1] - values) / (mu[1] - mu[0]), 0.0, 1.0)
    wm = np.clip((values - mu[1]) / (mu[2] - mu[1]), 0.0, 1.0)
    raw = np.array([csf.mean(), 1.0 - csf.mean() - wm.mean(), wm.mean()])
    fractions = raw.copy()
    if calibrate:
        fractions = np.clip([a + b * v for (a, b), v in zip(FRACTION_CALIBRATION.values(), raw, strict=True)], 0, 1)
        fractions = fractions / max(fractions.sum(), 1e-12)

    # Ventricles: deep, central CSF.
    csf_map = np.zeros(x.shape)
    csf_map[mask] = csf
    depth = ndimage.distance_transform_edt(mask, sampling=(sx, sy))
    candidates = (csf_map >= VENTRICLE_CSF_SHARE) & (depth >= VENTRICLE_MIN_DEPTH_MM)
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    ventricle_area = 0.0
    if count:
        centroids = np.asarray(ndimage.center_of_mass(candidates, labels, np.arange(1, count + 1)), dtype=np.float64)
        centre = np.array([rows.mean(), cols.mean()])
        extent = np.array([np.ptp(rows) + 1.0, np.ptp(cols) + 1.0])
        central = np.all(np.abs(centroids - centre) <= VENTRICLE_CENTRAL_BOX * extent, axis=1)
        keep = np.isin(labels, np.flatnonzero(central) + 1)
        ventricle_area = float(csf_map[keep].sum()) * pixel_area
    a, b = VENTRICLE_VOLUME_FIT
    return SliceMeasures(
        csf_fraction=float(fractions[0]),
        gm_fraction=float(fractions[1]),
        wm_fraction=float(fractions[2]),
        ventricle_area_mm2=ventricle_area,
        brain_area_mm2=brain_area,
        ventricle_volume_ml_estimate=float(max(a + b * ventricle_area, 0.0)),
        raw_csf_fraction=float(raw[0]),
        raw_gm_fraction=float(raw[1]),
        raw_wm_fraction=float(raw[2]),
        class_means=(float(mu[0]), float(mu[1]), float(mu[2])),
    )


def measure_slices(
    images: Iterable[Any], spacing_mm: float | Sequence[float] = 2.0, calibrate: bool = True
) -> list[SliceMeasures]:
    """:func:`measure_slice` of each image; a batch ``(N, 1, H, W)`` is split along its first axis."""
    return [measure_slice(image, spacing_mm, calibrate) for image in images]


# ---------------------------------------------------------------------------------------------------------------
# Adherence

_ALIASES = {
    "csf_fraction": ("csf_fraction", "csf"),
    "gm_fraction": ("gm_fraction", "grey_matter"),
    "wm_fraction": ("wm_fraction", "white_matter"),
}


def _facts_dict(facts: Any) -> Mapping[str, Any]:
    if isinstance(facts, Mapping):
        return facts
    if is_dataclass(facts):  # CaptionFacts
        return asdict(facts)
    raise TypeError(f"requested facts must be dicts or CaptionFacts, got {type(facts).__name__}")


def _lookup(facts: Mapping[str, Any], names: Sequence[str]) -> float | None:
    for name in names:
        value = facts.get(name)
        if value is not None:
            return float(value)
    return None


def _correlation(kind: str, a: np.ndarray, b: np.ndarray, attribute: str, stacklevel: int = 3) -> float | None:
    """Pearson or Spearman r; ``None`` without pairs, and (with a warning) for 1 pair or a constant input."""
    if a.size == 0:  # the attribute was not requested (or never measured): nothing to warn about
        return None
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        reason = "1 pair" if a.size < 2 else f"{'requested' if np.ptp(a) == 0 else 'measured'} values are constant"
        warnings.warn(
            f"adherence_scores: {kind} r of {attribute} is undefined ({reason}); reported as None.",
            stacklevel=stacklevel,
        )
        return None
    result = stats.pearsonr(a, b) if kind == "pearson" else stats.spearmanr(a, b)
    value = float(result.statistic)
    return value if math.isfinite(value) else None


def _mae(a: np.ndarray, b: np.ndarray) -> float | None:
    return float(np.mean(np.abs(a - b))) if a.size else None


def adherence_scores(requested: Sequence[Any], measured: Sequence[SliceMeasures]) -> dict[str, dict[str, Any]]:
    """Requested facts against measurements of the generated slices, per attribute.

    ``requested[i]`` holds the facts slice ``i`` was generated from: a dict with the phantom datalist's keys
    (``csf_fraction``, ``gm_fraction``, ``wm_fraction``, ``ventricle_volume_ml``, ``ventricle_size``) or the
    :class:`~common.data.brain.captions.CaptionFacts` names (``csf``, ``grey_matter``, ``white_matter``), or a
    ``CaptionFacts``. A pair enters an attribute's scores when the fact is known (not missing / ``None``) and
    the measurement is finite.

    Returns ``{attribute: {...}}``:

    * ``csf_fraction``, ``gm_fraction``, ``wm_fraction``: ``pearson_r``, ``mae`` (fraction units) and
      ``num_pairs``;
    * ``ventricle``: when every slice that has a ventricle fact has a numeric ``ventricle_volume_ml``
      (``"requested": "ventricle_volume_ml"``): ``pearson_r`` of the volume against the measured slice area,
      ``mae_ml`` against the estimated volume (:data:`VENTRICLE_VOLUME_FIT`), ``spearman_r``; otherwise
      (``"requested": "ventricle_size"``, words small / medium / large, a volume turned into its word) only the
      rank correlation ``spearman_r`` of the word's ordinal (:data:`VENTRICLE_SIZE_RANK`) with the measured area,
      ``pearson_r`` and ``mae_ml`` ``None``. Both give ``size_word_accuracy``: how often the word of the
      estimated volume is the requested word.

    Correlations are ``None`` (not NaN) when undefined: without pairs (the attribute was not requested), and with
    a warning for a single pair or a constant input (e.g. every slice asked for the same CSF fraction). ``mae`` is
    ``None`` without pairs.
    """
    if len(requested) != len(measured):
        raise ValueError(f"{len(requested)} requested facts but {len(measured)} measurements.")
    if not all(isinstance(m, SliceMeasures) for m in measured):
        raise TypeError("`measured` must hold SliceMeasures (from measure_slice).")
    facts = [_facts_dict(f) for f in requested]
    scores: dict[str, dict[str, Any]] = {}
    for attribute, names in _ALIASES.items():
        pairs = [
            (v, getattr(m, attribute))
            for f, m in zip(facts, measured, strict=True)
            if (v := _lookup(f, names)) is not None
        ]
        pairs = [(v, w) for v, w in pairs if math.isfinite(v) and math.isfinite(w)]
        want, got = (
            (np.array(column, dtype=np.float64) for column in zip(*pairs, strict=True)) if pairs else (np.empty(0),) * 2
        )
        scores[attribute] = {
            "pearson_r": _correlation("pearson", want, got, attribute),
            "mae": _mae(want, got),
            "num_pairs": int(want.size),
        }
    scores["ventricle"] = _ventricle_scores(facts, measured)
    return scores


def _ventricle_scores(facts: Sequence[Mapping[str, Any]], measured: Sequence[SliceMeasures]) -> dict[str, Any]:
    volumes, words = [], []
    for f in facts:
        volume = f.get("ventricle_volume_ml")
        word = f.get("ventricle_size")
        if word is not None and word not in VENTRICLE_SIZE_RANK:
            raise ValueError(f"ventricle_size must be one of {tuple(VENTRICLE_SIZE_RANK)}, got {word!r}.")
        volumes.append(None if volume is None else float(volume))
        words.append(word if word is not None else (None if volume is None else ventricle_size_word(float(volume))))
    numeric = all(v is not None for v, w in zip(volumes, words, strict=True) if w is not None)
    keep = [i for i, m in enumerate(measured) if words[i] is not None and math.isfinite(m.ventricle_area_mm2)]
    area = np.array([measured[i].ventricle_area_mm2 for i in keep], dtype=np.float64)
    estimate = np.array([measured[i].ventricle_volume_ml_estimate for i in keep], dtype=np.float64)
    ranks = np.array([VENTRICLE_SIZE_RANK[words[i]] for i in keep], dtype=np.float64)
    accuracy = float(np.mean([measured[i].ventricle_size == words[i] for i in keep])) if keep else None
    result: dict[str, Any] = {"requested": "ventricle_volume_ml" if numeric and keep else "ventricle_size"}
    if result["requested"] == "ventricle_volume_ml":
        volume = np.array([volumes[i] for i in keep], dtype=np.float64)
        result["pearson_r"] = _correlation("pearson", volume, area, "ventricle volume vs area", 4)
        result["spearman_r"] = _correlation("spearman", volume, area, "ventricle volume vs area", 4)
        result["mae_ml"] = _mae(volume, estimate)
    else:
        result["pearson_r"] = None
        result["spearman_r"] = _correlation("spearman", ranks, area, "ventricle size word vs area", 4)
        result["mae_ml"] = None
    result["size_word_accuracy"] = accuracy
    result["num_pairs"] = len(keep)
    return result


def measurement_ceiling(
    entries: Sequence[Mapping[str, Any]],
    load: Callable[[Mapping[str, Any]], Any],
    spacing_mm: float | Sequence[float] = 2.0,
) -> dict[str, dict[str, Any]]:
    """:func:`adherence_scores` of REAL slices against their own facts: the best a generated set can score.

    ``entries`` are phantom datalist entries (facts as in ``datalist.json``); ``load(entry)`` returns the entry's
    T1w slice ``(H, W)`` / ``(1, H, W)`` in [0, 1] (e.g. ``nibabel.load(root / entry["image"]).get_fdata()``).
    """
    if not entries:
        raise ValueError("measurement_ceiling needs at least one entry.")
    measured = [measure_slice(load(entry), spacing_mm) for entry in entries]
    return adherence_scores(list(entries), measured)


class BrainMeasureAdherence:
    """Adherence of generated brain slices to the facts of their captions, by the brain measures (for
    :class:`common.evaluation.captioned.CaptionedGeneration`).

    ``self(entries, images (N, 1, H, W))`` measures each slice (:func:`measure_slices`) and scores it against its
    entry's facts (:func:`adherence_scores`); undefined correlations (a constant request, a model that ignores its
    captions) are ``None``, without warnings.
    """

    description = "the brain measures (common.evaluation.brain_measures)"

    def __init__(self, spacing_mm: float | Sequence[float] = 2.0) -> None:
        self.spacing_mm = spacing_mm

    def __call__(self, entries: Sequence[Mapping[str, Any]], images: Any) -> dict[str, dict[str, Any]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return adherence_scores(entries, measure_slices(np.asarray(images)[:, 0], self.spacing_mm))

    @staticmethod
    def metrics(scores: Mapping[str, Any]) -> dict[str, float | None]:
        """The headline figures of :meth:`__call__`'s scores, by metric name."""
        return {
            "ventricle_adherence_pearson_r": scores["ventricle"]["pearson_r"],
            "ventricle_size_word_accuracy": scores["ventricle"]["size_word_accuracy"],
            "csf_fraction_pearson_r": scores["csf_fraction"]["pearson_r"],
            "gm_fraction_pearson_r": scores["gm_fraction"]["pearson_r"],
            "wm_fraction_pearson_r": scores["wm_fraction"]["pearson_r"],
        }

    @staticmethod
    def summary(generated: Mapping[str, Any], real: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Rows of the results table: the generated images' figure beside the real images' (its ceiling)."""
        return [
            {
                "measure": "ventricle adherence Pearson r, requested volume vs measured area",
                "generated": generated["ventricle"]["pearson_r"],
                "real": real["ventricle"]["pearson_r"],
            },
            {
                "measure": "ventricle size word accuracy",
                "generated": generated["ventricle"]["size_word_accuracy"],
                "real": real["ventricle"]["size_word_accuracy"],
            },
        ]
