"""Synthetic brain MRI subjects (T1w and FLAIR axial slices) built from the MNI152 2009 templates.

The MNI ICBM152 2009 (nonlinear, symmetric) T1 template and its grey- and white-matter probability maps ship
inside the ``nilearn`` wheel; nothing is downloaded. Every subject is a deterministic function of
``(seed, subject index)``:

1. **Anatomy.** A small random affine (scale about 3 % s.d., clipped to +-8 %; rotation <= 3 deg; translation <= 2 mm) and a smooth random
   displacement field (cubic B-spline on a 30 mm control grid, 1.5-3 mm standard deviation) map subject space
   (MNI millimetres of the output grid) onto the template.
2. **Age** (uniform 45-85 years) drives atrophy, applied to the template tissue maps:

   - *ventricle enlargement*: the template's lateral ventricles (largest deep CSF component) grow outwards by
     ``ventricle_growth_mm`` (0 at 45 years, about 3 mm at 85, times a per-subject rate, plus a per-subject
     offset), i.e. tissue within that distance of the ventricle surface becomes CSF;
   - *cortical thinning*: grey matter within ``cortical_thinning_mm`` (0 at 45, about 1.2 mm at 85) of the
     external (sulcal and pial) CSF is replaced by CSF, which also widens the sulci;
   - *white-matter hyperintensities* (WMH): a patchy periventricular rim whose width grows with age and up to 12
     deep lesions whose onset ages and sizes are drawn per subject; both only replace white matter.

   Every effect is monotone in age for a fixed subject: an older age never gives smaller ventricles, thinner
   sulci or less WMH (``BrainPhantomGenerator.subject(index, age=...)`` overrides the drawn age and keeps every
   other random draw).
3. **Contrast.** T1w and FLAIR are rendered from the *same* deformed partial-volume maps (CSF, GM, WM, WMH):
   T1w WM > GM > CSF (WMH slightly dark); FLAIR GM > WM > CSF (CSF suppressed), WMH brightest. Tissue
   intensities are jittered per subject, each contrast gets its own smooth multiplicative bias field
   (exponential of a random quadratic polynomial) and Rician noise. The :class:`IntensityModel` sets how much:
   the default ``ukbiobank`` leaves the residual field of a bias-corrected image and a T1w grey/white contrast
   that fades with age and varies little between subjects. Outside the intracranial mask the images are 0
   (skull-stripped, like UK Biobank ``T1_brain_to_MNI``).
4. **Slices.** Only the output slices are computed: the maps are sampled with
   :func:`scipy.ndimage.map_coordinates` at the output voxel centres. At spacings above 1 mm the template maps
   are first blurred to the larger voxel (box point-spread function) and every edge that atrophy and lesions add
   is a ramp one voxel wide, so the values are voxel averages (no aliasing). By default 5 consecutive axial
   slices centred at MNI z = 15 mm (bodies of the lateral ventricles), field of view 160 x 224 mm centred at
   (x, y) = (0, -17) mm, array axes (x: left-right, y: posterior-anterior), RAS+ affines in MNI millimetres.
5. **Intensity scale.** Each contrast of each subject is normalised to [0, 1] with a robust min-max over the
   brain voxels of all its slices (0.5th and 99.5th percentiles), clipped; background stays 0.

Ground truth (``PhantomSubject.facts`` / ``slice_facts``): age, ventricle volume (ml; the enlarged ventricle's
partial-volume map integrated on the 1 mm template grid times the subject's affine volume change, so it is exact
for the affine part and ignores the small, zero-mean Jacobian of the nonlinear field), WMH volume (ml; same, on
a 2 mm grid), per-slice GM / WM (WMH included) / CSF fractions of the intracranial volume on that slice, and the
slice index and z position (MNI mm).

Captions (:func:`build_caption`) use a short fixed vocabulary: ``"T1-weighted image of a brain of a 72 year old
subject with large ventricles."``; the ventricle word is ``small`` below :data:`VENTRICLE_SMALL_MAX_ML`,
``large`` from :data:`VENTRICLE_LARGE_MIN_ML`, ``medium`` in between. The thresholds (25 and 37 ml) are the
tertiles of the ventricle volumes of 400 subjects drawn with seed 0 (about 15-90 ml over ages 45-85), so the
three words are about equally frequent.

These are demonstration data with known ground truth, not a model of any real population.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from common.data.splits import split_generated_subjects
from common.io.atomic import atomic_path, write_json

__all__ = [
    "AGE_RANGE",
    "INTENSITY_MODELS",
    "VENTRICLE_LARGE_MIN_ML",
    "VENTRICLE_SMALL_MAX_ML",
    "BrainPhantomGenerator",
    "IntensityModel",
    "PhantomGeometry",
    "PhantomParameters",
    "PhantomSubject",
    "build_caption",
    "intensity_model",
    "subject_id",
    "ventricle_size_word",
    "write_phantom_dataset",
]

#: Ages (years) are drawn uniformly in this range.
AGE_RANGE = (45.0, 85.0)
#: Ventricle volume (ml) below which a caption says "small ventricles".
VENTRICLE_SMALL_MAX_ML = 25.0
#: Ventricle volume (ml) from which a caption says "large ventricles" ("medium" in between).
VENTRICLE_LARGE_MIN_ML = 37.0

#: Ventricle growth (mm) at the top of the age range for a subject with the median rate.
_VENTRICLE_GROWTH_AT_MAX_AGE_MM = 3.0
#: Largest ventricle growth (mm) ever applied (keeps the lateral ventricles inside the white matter).
_VENTRICLE_GROWTH_CAP_MM = 8.0
#: Ventricle signed distances are clipped to this value (mm).
_SD_CLIP_MM = 20.0
#: Cortical thinning (mm) at the top of the age range for a subject with the median rate.
_THINNING_AT_MAX_AGE_MM = 1.2
#: Number of candidate deep white-matter lesions per subject.
_NUM_DEEP_LESIONS = 12
#: Displacement-field control-point spacing (mm) and the box (MNI mm) it covers.
_CONTROL_SPACING_MM = 30.0
_CONTROL_BOX_MM = ((-110.0, 110.0), (-150.0, 110.0), (-90.0, 120.0))
#: Centre (MNI mm) of the random affine.
_AFFINE_CENTRE_MM = np.array([0.0, -17.0, 5.0])

_TISSUES = ("csf", "gm", "wm", "wmh")


#: Facts of every phantom slice that the FID feature network learns to regress (datalist keys, in output order).
FEATURE_TARGETS = ("age", "ventricle_volume_ml", "gm_fraction", "wm_fraction", "csf_fraction", "wmh_volume_ml")


def subject_id(index: int) -> str:
    """BIDS-like subject label of a phantom index: ``7 -> "sub-0007"``."""
    return f"sub-{int(index):04d}"


def ventricle_size_word(ventricle_volume_ml: float) -> str:
    """``small`` / ``medium`` / ``large`` from :data:`VENTRICLE_SMALL_MAX_ML` and :data:`VENTRICLE_LARGE_MIN_ML`."""
    if ventricle_volume_ml < VENTRICLE_SMALL_MAX_ML:
        return "small"
    if ventricle_volume_ml < VENTRICLE_LARGE_MIN_ML:
        return "medium"
    return "large"


def build_caption(age: float, ventricle_volume_ml: float, contrast: str = "T1-weighted") -> str:
    """Caption of a slice, e.g. ``"T1-weighted image of a brain of a 72 year old subject with large ventricles."``.

    ``age`` is rounded to whole years; ``contrast`` is the leading phrase (``"T1-weighted"``, ``"FLAIR"``).
    """
    return (
        f"{contrast} image of a brain of a {int(round(age))} year old subject "
        f"with {ventricle_size_word(ventricle_volume_ml)} ventricles."
    )


@dataclass(frozen=True)
class PhantomGeometry:
    """Output grid: in-plane shape and spacing, and which axial slices.

    ``slice_shape`` is (x: left-right, y: posterior-anterior) in voxels of ``spacing_mm`` (isotropic). The
    ``num_slices`` slices are ``slice_step`` voxels apart, centred at ``center_mm`` (MNI x, y, z in mm; the
    default z = 15 mm cuts through the bodies of the lateral ventricles).
    """

    spacing_mm: float
    slice_shape: tuple[int, int]
    num_slices: int = 5
    slice_step: int = 1
    center_mm: tuple[float, float, float] = (0.0, -17.0, 15.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slice_shape", tuple(int(s) for s in self.slice_shape))
        object.__setattr__(self, "center_mm", tuple(float(c) for c in self.center_mm))
        if not self.spacing_mm > 0:
            raise ValueError(f"spacing_mm must be > 0, got {self.spacing_mm}")
        if len(self.slice_shape) != 2 or min(self.slice_shape) < 8:
            raise ValueError(f"slice_shape must be two sizes >= 8, got {self.slice_shape}")
        if int(self.num_slices) < 1 or int(self.slice_step) < 1:
            raise ValueError(f"num_slices and slice_step must be >= 1, got {self.num_slices}, {self.slice_step}")
        if len(self.center_mm) != 3:
            raise ValueError(f"center_mm must be (x, y, z), got {self.center_mm}")

    @classmethod
    def demo(cls, **kwargs) -> PhantomGeometry:
        """2 mm, 80 x 112 (the demo bundles' image size)."""
        return cls(spacing_mm=2.0, slice_shape=(80, 112), **kwargs)

    @classmethod
    def full(cls, **kwargs) -> PhantomGeometry:
        """1 mm, 160 x 224 (the UK Biobank slice size of the reference article)."""
        return cls(spacing_mm=1.0, slice_shape=(160, 224), **kwargs)

    @property
    def slice_z_mm(self) -> np.ndarray:
        """MNI z (mm) of every slice, inferior to superior."""
        offsets = (np.arange(self.num_slices) - (self.num_slices - 1) / 2.0) * self.slice_step * self.spacing_mm
        return self.center_mm[2] + offsets

    def in_plane_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """MNI x (length ``slice_shape[0]``) and y (length ``slice_shape[1]``) of the voxel centres."""
        s = self.spacing_mm
        x = self.center_mm[0] + (np.arange(self.slice_shape[0]) - (self.slice_shape[0] - 1) / 2.0) * s
        y = self.center_mm[1] + (np.arange(self.slice_shape[1]) - (self.slice_shape[1] - 1) / 2.0) * s
        return x, y

    def slice_affine(self, slice_index: int) -> np.ndarray:
        """4x4 RAS+ affine (MNI mm) of one 2D slice: voxel (i, j) -> (x, y, z)."""
        x, y = self.in_plane_mm()
        affine = np.diag([self.spacing_mm, self.spacing_mm, self.spacing_mm, 1.0])
        affine[:3, 3] = (x[0], y[0], self.slice_z_mm[slice_index])
        return affine

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["slice_shape"] = list(self.slice_shape)
        data["center_mm"] = list(self.center_mm)
        return data


@dataclass(frozen=True)
class PhantomParameters:
    """Every random draw of one subject (anatomy, atrophy, contrast); noise is drawn when rendering."""

    age: float
    scale: np.ndarray
    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    displacement_ctrl: np.ndarray
    ventricle_growth_mm: float
    cortical_thinning_mm: float
    wmh_periventricular_mm: float
    wmh_patch_ctrl: np.ndarray
    wmh_lesions: np.ndarray  # (K, 4): centre x, y, z (template mm), current radius (mm)
    t1_intensity: dict
    flair_intensity: dict
    bias_coefficients: np.ndarray  # (2, 9): T1w, FLAIR
    noise_sigma: np.ndarray  # (2,): T1w, FLAIR

    @property
    def volume_scale(self) -> float:
        """Subject volume / template volume of the affine part."""
        return float(np.prod(self.scale))


@dataclass
class PhantomSubject:
    """One synthetic subject: ``num_slices`` axial slices of T1w and FLAIR, their geometry and ground truth."""

    subject_id: str
    t1: np.ndarray  # (S, H, W) float32 in [0, 1]
    flair: np.ndarray  # (S, H, W) float32 in [0, 1]
    affines: np.ndarray  # (S, 4, 4) RAS+ affines in MNI mm
    facts: dict
    slice_facts: list[dict]
    captions: list[str]
    tissue: dict[str, np.ndarray] = field(repr=False)  # partial volumes csf/gm/wm/wmh, (S, H, W) float32
    brain_mask: np.ndarray = field(repr=False)  # (S, H, W) bool
    parameters: PhantomParameters | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------------------
# Template


@dataclass(frozen=True)
class _Template:
    origin_mm: np.ndarray  # MNI mm of voxel (0, 0, 0) of the cropped grid (1 mm voxels, RAS axes)
    mask: np.ndarray  # intracranial mask (0/1)
    gm: np.ndarray
    wm: np.ndarray
    ventricle_sd: np.ndarray  # signed distance (mm) to the lateral-ventricle surface, < 0 inside
    cortex_distance: np.ndarray  # distance (mm) to external CSF (or outside the brain)
    ventricle_sd_voxels: np.ndarray  # ventricle_sd of the voxels that any allowed growth can reach
    wm_points_mm: np.ndarray  # (N, 3) 2 mm template grid points with white matter
    wm_points_wm: np.ndarray  # (N,) their white-matter fraction
    wm_points_sd: np.ndarray  # (N,) their ventricle signed distance
    deep_wm_mm: np.ndarray  # (M, 3) candidate centres of deep white-matter lesions


_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _read_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(T1, GM, WM) at 1 mm scaled to [0, 1] as nilearn's ``load_mni152_*_template(resolution=1)``, and the affine.

    The files are read straight from nilearn's package folder (importing ``nilearn.datasets`` takes seconds);
    if they are not where nilearn 0.10-0.12 keeps them, nilearn's loaders are used.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNI152 templates come from nilearn: pip install nilearn")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if all((data_dir / name).is_file() for name in _TEMPLATE_FILES.values()):
        imgs = {key: nib.load(data_dir / name) for key, name in _TEMPLATE_FILES.items()}
    else:  # pragma: no cover - depends on the nilearn version
        from nilearn import datasets

        imgs = {
            "t1": datasets.load_mni152_template(resolution=1),
            "gm": datasets.load_mni152_gm_template(resolution=1),
            "wm": datasets.load_mni152_wm_template(resolution=1),
        }
    arrays = []
    for key in ("t1", "gm", "wm"):
        data = np.asarray(imgs[key].dataobj, dtype=np.float32)
        arrays.append(data / data.max())
        if not np.allclose(imgs[key].affine, imgs["t1"].affine) or data.shape != arrays[0].shape:
            raise RuntimeError("nilearn's MNI152 T1, GM and WM templates are not on the same grid")
    affine = imgs["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError(f"unexpected MNI152 template affine from nilearn:\n{affine}")
    return arrays[0], arrays[1], arrays[2], affine


def _edt_in_box(mask: np.ndarray, lo, hi) -> np.ndarray:
    """Distance transform of ``mask`` computed only inside the box [lo, hi) (0 outside)."""
    box = tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, mask.shape, strict=True))
    out = np.zeros(mask.shape, dtype=np.float32)
    out[box] = ndi.distance_transform_edt(mask[box])
    return out


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    """Tissue maps from nilearn's MNI152 2009 templates (1 mm), cropped to the brain; cached per process."""
    t1, gm, wm, affine = _read_mni152()
    mask = t1 > 0  # the template is skull-stripped: intracranial mask (as load_mni152_brain_mask(threshold=0))
    lo = np.maximum(np.argwhere(mask).min(0) - 6, 0)
    hi = np.minimum(np.argwhere(mask).max(0) + 7, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    mask, gm, wm = mask[crop], np.clip(gm[crop], 0, 1), np.clip(wm[crop], 0, 1)  # the mask has no holes
    origin = affine[:3, 3] + lo
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    gm *= mask
    wm *= mask
    csf = mask * (1.0 - gm - wm)

    # Lateral ventricles: the largest CSF component deeper than 8 mm in a central box.
    box_mm = np.array([[-35.0, 35.0], [-60.0, 45.0], [-20.0, 45.0]])
    box_lo, box_hi = box_mm[:, 0] - origin, box_mm[:, 1] - origin + 1
    depth = _edt_in_box(mask, box_lo - 12, box_hi + 12)
    in_box = np.zeros(mask.shape, dtype=bool)
    in_box[tuple(slice(int(a), int(b)) for a, b in zip(box_lo, box_hi, strict=True))] = True
    labels, num = ndi.label((csf > 0.5) & (depth > 8) & in_box)
    if num == 0:
        raise RuntimeError("no ventricle found in the MNI152 template")
    sizes = ndi.sum_labels(np.ones_like(labels), labels, index=np.arange(1, num + 1))
    ventricles = labels == (int(np.argmax(sizes)) + 1)
    if not 5_000 < ventricles.sum() < 60_000:
        raise RuntimeError(f"unexpected template ventricle volume {ventricles.sum() / 1000:.1f} ml")
    v_idx = np.argwhere(ventricles)
    margin = _SD_CLIP_MM + 5
    v_lo, v_hi = v_idx.min(0) - margin, v_idx.max(0) + margin + 1
    outside = _edt_in_box(~ventricles, v_lo, v_hi) - 0.5
    inside = _edt_in_box(ventricles, v_lo, v_hi) - 0.5
    near = np.zeros(mask.shape, dtype=bool)
    near[tuple(slice(max(int(a), 0), int(b)) for a, b in zip(v_lo, v_hi, strict=True))] = True
    ventricle_sd = np.where(ventricles, -inside, np.where(near, outside, _SD_CLIP_MM))
    ventricle_sd = np.minimum(ventricle_sd, _SD_CLIP_MM)
    ventricle_sd = ndi.gaussian_filter(ventricle_sd, 1.0).astype(np.float32)

    # External CSF: outside the brain, or CSF that is not (near) the ventricles.
    external = ~mask | ((csf > 0.5) & (ventricle_sd > 3.0))
    cortex_distance = np.clip(ndi.distance_transform_edt(~external) - 0.5, 0, None)
    cortex_distance = ndi.gaussian_filter(cortex_distance, 0.7).astype(np.float32)

    reach = ventricle_sd < _VENTRICLE_GROWTH_CAP_MM + 1.0
    ventricle_sd_voxels = (ventricle_sd[reach & mask]).astype(np.float32)

    sub = (slice(0, None, 2),) * 3
    wm_sub = wm[sub]
    keep = wm_sub > 0.05
    idx = np.argwhere(keep)
    wm_points_mm = (origin + 2 * idx).astype(np.float32)
    deep = (wm > 0.9) & (cortex_distance > 6) & (ventricle_sd > 6)
    deep_idx = np.argwhere(deep[sub])
    return _Template(
        origin_mm=origin.astype(np.float64),
        mask=mask.astype(np.float32),
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        ventricle_sd=ventricle_sd,
        cortex_distance=cortex_distance,
        ventricle_sd_voxels=ventricle_sd_voxels,
        wm_points_mm=wm_points_mm,
        wm_points_wm=wm_sub[keep].astype(np.float32),
        wm_points_sd=ventricle_sd[sub][keep].astype(np.float32),
        deep_wm_mm=(origin + 2 * deep_idx).astype(np.float32),
    )


@functools.lru_cache(maxsize=4)
def _template_for_spacing(spacing_mm: float) -> _Template:
    """The template with its mask and tissue maps blurred from a 1 mm to a ``spacing_mm`` box point-spread function."""
    template = _load_template()
    if spacing_mm <= 1.0:
        return template
    sigma = math.sqrt((spacing_mm**2 - 1.0) / 12.0)
    blur = {k: ndi.gaussian_filter(getattr(template, k), sigma) for k in ("mask", "gm", "wm")}
    return dataclasses.replace(template, **blur)


def _sample(volume: np.ndarray, points_mm: np.ndarray, origin: np.ndarray, cval: float) -> np.ndarray:
    """Trilinear interpolation of a 1 mm template volume at (N, 3) MNI points."""
    coords = (points_mm - origin).T
    return ndi.map_coordinates(volume, coords, order=1, mode="constant", cval=cval, prefilter=False)


def _control_points(box: tuple, spacing: float) -> tuple[int, ...]:
    return tuple(int(math.ceil((b - a) / spacing)) + 1 for a, b in box)


def _spline_field(ctrl: np.ndarray, points_mm: np.ndarray, box: tuple, spacing: float) -> np.ndarray:
    """Cubic B-spline field of control values ``ctrl`` (C, nx, ny, nz) at (N, 3) points; returns (N, C)."""
    coords = np.stack([(points_mm[:, a] - box[a][0]) / spacing for a in range(3)])
    return np.stack([ndi.map_coordinates(c, coords, order=3, mode="nearest", prefilter=False) for c in ctrl], axis=-1)


def _bspline_matrix(t: np.ndarray, n: int) -> np.ndarray:
    """Cubic B-spline weights (len(t), n) of control points 0..n-1 at positions ``t`` (edge coefficients repeat).

    Same values as ``map_coordinates(coefficients, ..., order=3, mode="nearest", prefilter=False)``.
    """
    t = np.asarray(t, dtype=np.float64)
    base = np.floor(t).astype(int)
    weights = np.zeros((len(t), n))
    rows = np.arange(len(t))
    for k in range(-1, 3):
        u = np.abs(t - (base + k))
        w = np.where(u < 1, 2.0 / 3.0 - u**2 + u**3 / 2.0, np.where(u < 2, (2.0 - u) ** 3 / 6.0, 0.0))
        np.add.at(weights, (rows, np.clip(base + k, 0, n - 1)), w)
    return weights


def _spline_grid(ctrl: np.ndarray, axes_mm: tuple, box: tuple, spacing: float) -> np.ndarray:
    """Cubic B-spline field (C, nx, ny, nz) on the grid ``axes_mm`` = (x, y, z); returns (C, len(x), len(y), len(z))."""
    mats = [_bspline_matrix((np.asarray(a) - box[i][0]) / spacing, ctrl.shape[i + 1]) for i, a in enumerate(axes_mm)]
    return np.einsum("cijk,xi,yj,zk->cxyz", ctrl, *mats, optimize=True)


def _rotation(deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bias_basis(points_mm: np.ndarray) -> np.ndarray:
    """Quadratic polynomial basis (N, 9) of normalised MNI coordinates."""
    x = (points_mm[:, 0] - 0.0) / 80.0
    y = (points_mm[:, 1] + 17.0) / 100.0
    z = (points_mm[:, 2] - 5.0) / 80.0
    return np.stack([x, y, z, x * x - 0.3, y * y - 0.3, z * z - 0.3, x * y, x * z, y * z], axis=-1)


_WMH_PATCH_BOX = ((-80.0, 80.0), (-120.0, 90.0), (-30.0, 80.0))
_WMH_PATCH_SPACING = 12.0


T1_NOISE_RANGE = (0.01, 0.03)  # Rician noise sigma of T1w, before normalisation


@dataclass(frozen=True)
class IntensityModel:
    """How intensities vary between subjects after preprocessing: the bias field left, the T1w tissue contrast.

    ``bias_std`` is the standard deviation of the bias field's quadratic polynomial coefficients (both contrasts).
    With ``age_contrast`` the T1w grey/white ratio rises with age (grey-white contrast fades, Salat et al. 2009)
    and varies little between subjects, as after bias-field correction and intensity normalisation; without it,
    every tissue intensity is drawn independently in wide ranges.
    """

    name: str
    bias_std: float
    age_contrast: bool

    def draw_t1(self, rng: np.random.Generator, age: float) -> dict[str, float]:
        """T1w tissue intensities of one subject (WM > GM > CSF; WMH near GM); four draws from ``rng``."""
        if not self.age_contrast:
            t1 = {"csf": rng.uniform(0.12, 0.25), "gm": rng.uniform(0.50, 0.62), "wm": rng.uniform(0.82, 0.95)}
            t1["wmh"] = t1["gm"] * rng.uniform(0.95, 1.1)
            return t1
        a = float(np.clip((age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0]), 0.0, 1.0))
        wm = rng.uniform(0.87, 0.93)
        gm = wm * (0.60 + 0.06 * a + rng.uniform(-0.03, 0.03))
        csf = wm * rng.uniform(0.16, 0.26)
        return {"csf": csf, "gm": gm, "wm": wm, "wmh": gm * rng.uniform(0.95, 1.1)}


#: Intensity models by name. ``ukbiobank`` (the default) resembles UK Biobank's preprocessed ``T1_brain_to_MNI``
#: and ``T2_FLAIR`` images: bias-field corrected (FAST), so only a residual field is left (coefficient s.d. 0.015,
#: a few per cent across the brain), and an age-dependent T1w contrast with a small spread between subjects.
#: ``uncorrected`` is the model of the data sets written before it (bias coefficient s.d. 0.07, tissue intensities
#: drawn independently), kept so that those data sets can be rebuilt and their ceilings measured.
INTENSITY_MODELS = {
    "ukbiobank": IntensityModel("ukbiobank", bias_std=0.015, age_contrast=True),
    "uncorrected": IntensityModel("uncorrected", bias_std=0.07, age_contrast=False),
}


def intensity_model(name: str) -> IntensityModel:
    """The :data:`INTENSITY_MODELS` entry ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in INTENSITY_MODELS:
        raise ValueError(f"unknown intensity model {name!r}: choose one of {', '.join(INTENSITY_MODELS)}")
    return INTENSITY_MODELS[name]


class BrainPhantomGenerator:
    """Deterministic synthetic subjects: ``BrainPhantomGenerator(geometry, seed, intensity).subject(i)``.

    The same ``(seed, index)`` always gives the same subject, whatever the order of the calls or the geometry's
    number of slices (the anatomy does not depend on the geometry; only the noise does). The anatomy does not
    depend on ``intensity`` (an :data:`INTENSITY_MODELS` name) either: its random stream is separate.
    """

    def __init__(self, geometry: PhantomGeometry, seed: int = 0, intensity: str = "ukbiobank"):
        self.intensity = intensity_model(intensity)
        if not isinstance(geometry, PhantomGeometry):
            raise TypeError(f"geometry must be a PhantomGeometry, got {type(geometry).__name__}")
        self.geometry = geometry
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.template = _load_template()
        self._maps = _template_for_spacing(float(geometry.spacing_mm))
        self._ramp = max(1.0, float(geometry.spacing_mm))

    # -- random draws ------------------------------------------------------------------------------------------

    def _streams(self, index: int) -> list[np.random.Generator]:
        if int(index) < 0:
            raise ValueError(f"subject index must be >= 0, got {index}")
        children = np.random.SeedSequence([self.seed, int(index)]).spawn(4)
        return [np.random.default_rng(c) for c in children]

    def parameters(self, index: int, age: float | None = None) -> PhantomParameters:
        """Random parameters of subject ``index``; ``age`` overrides the drawn age and nothing else."""
        anatomy, age_rng, contrast, _ = self._streams(index)
        drawn_age = float(age_rng.uniform(*AGE_RANGE))
        age = drawn_age if age is None else float(age)
        if not 0 < age < 130:
            raise ValueError(f"age must be in (0, 130) years, got {age}")
        a = max(0.0, (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0]))

        scale = np.exp(anatomy.normal(0.0, 0.02, 3) + anatomy.normal(0.0, 0.02))
        scale = np.clip(scale, 0.92, 1.08)
        rotation = np.clip(anatomy.normal(0.0, 1.5, 3), -3.0, 3.0)
        translation = np.clip(anatomy.normal(0.0, 1.0, 3), -2.0, 2.0)
        sigma = anatomy.uniform(1.5, 3.0)
        shape = _control_points(_CONTROL_BOX_MM, _CONTROL_SPACING_MM)
        ctrl = anatomy.normal(0.0, sigma, (3, *shape))
        ctrl = np.stack([ndi.spline_filter(c, order=3, mode="nearest") for c in ctrl])

        ventricle_rate = float(np.exp(anatomy.normal(0.0, 0.25)))
        ventricle_offset = float(anatomy.normal(0.0, 0.4))
        growth = ventricle_rate * _VENTRICLE_GROWTH_AT_MAX_AGE_MM * a**1.3 + ventricle_offset
        growth = float(np.clip(growth, 0.0, _VENTRICLE_GROWTH_CAP_MM))
        thinning_rate = float(np.exp(anatomy.normal(0.0, 0.2)))
        thinning = float(np.clip(thinning_rate * _THINNING_AT_MAX_AGE_MM * a, 0.0, 2.5))

        wmh_rate = float(np.exp(anatomy.normal(0.0, 0.5)))
        wmh_pv = float(np.clip(wmh_rate * (4.0 * a - 1.0), 0.0, 6.0))
        patch_shape = _control_points(_WMH_PATCH_BOX, _WMH_PATCH_SPACING)
        patch = ndi.spline_filter(anatomy.normal(0.0, 1.0, patch_shape), order=3, mode="nearest")
        pick = anatomy.choice(len(self.template.deep_wm_mm), _NUM_DEEP_LESIONS)
        centres = self.template.deep_wm_mm[pick].astype(np.float64)
        onsets = AGE_RANGE[0] + 5.0 + anatomy.uniform(0.0, 60.0, _NUM_DEEP_LESIONS) / wmh_rate
        max_radius = anatomy.uniform(1.5, 4.5, _NUM_DEEP_LESIONS)
        radius = max_radius * np.clip((age - onsets) / 15.0, 0.0, 1.0)
        lesions = np.concatenate([centres, radius[:, None]], axis=1)

        t1 = self.intensity.draw_t1(contrast, age)
        flair = {
            "csf": contrast.uniform(0.04, 0.12),
            "gm": contrast.uniform(0.66, 0.78),
            "wm": contrast.uniform(0.48, 0.58),
            "wmh": contrast.uniform(1.05, 1.3),
        }
        bias = contrast.normal(0.0, self.intensity.bias_std, (2, 9))
        noise_sigma = np.array([contrast.uniform(*T1_NOISE_RANGE), contrast.uniform(0.015, 0.03)])
        return PhantomParameters(
            age=age,
            scale=scale,
            rotation_deg=rotation,
            translation_mm=translation,
            displacement_ctrl=ctrl,
            ventricle_growth_mm=growth,
            cortical_thinning_mm=thinning,
            wmh_periventricular_mm=wmh_pv,
            wmh_patch_ctrl=patch[None],
            wmh_lesions=lesions,
            t1_intensity={k: float(v) for k, v in t1.items()},
            flair_intensity={k: float(v) for k, v in flair.items()},
            bias_coefficients=bias,
            noise_sigma=noise_sigma,
        )

    # -- geometry and tissue -----------------------------------------------------------------------------------

    def _linear(self, p: PhantomParameters) -> np.ndarray:
        """Linear part of the subject -> template map."""
        return _rotation(p.rotation_deg).T @ np.diag(1.0 / p.scale)

    def to_template(self, p: PhantomParameters, points_mm: np.ndarray) -> np.ndarray:
        """Map (N, 3) subject-space MNI points to template points (affine + smooth displacement)."""
        linear = self._linear(p)
        q = (points_mm - _AFFINE_CENTRE_MM) @ linear.T + _AFFINE_CENTRE_MM - p.translation_mm
        return q + _spline_field(p.displacement_ctrl, points_mm, _CONTROL_BOX_MM, _CONTROL_SPACING_MM)

    def _wmh_fraction(self, p: PhantomParameters, q: np.ndarray, ventricle_sd: np.ndarray, ramp: float) -> np.ndarray:
        """WMH fraction of the white matter at template points ``q`` (edges ``ramp`` mm wide)."""
        h = np.zeros(len(q), dtype=np.float64)
        if p.wmh_periventricular_mm > 0:
            d = ventricle_sd - p.ventricle_growth_mm
            rim = np.clip((p.wmh_periventricular_mm - d) / (1.5 * ramp) + 0.5, 0.0, 1.0) * (d > -1.0)
            near = rim > 0
            if near.any():
                f = _spline_field(p.wmh_patch_ctrl, q[near], _WMH_PATCH_BOX, _WMH_PATCH_SPACING)[:, 0]
                h[near] = rim[near] * np.clip(0.6 + 1.5 * f, 0.0, 1.0)
        for cx, cy, cz, r in p.wmh_lesions:
            if r <= 0:
                continue
            close = np.abs(q - (cx, cy, cz)).max(axis=1) < r + ramp
            if close.any():
                dist = np.linalg.norm(q[close] - (cx, cy, cz), axis=1)
                h[close] = np.maximum(h[close], np.clip((r - dist) / ramp + 0.5, 0.0, 1.0))
        return h

    def tissue_at(self, p: PhantomParameters, q: np.ndarray) -> dict[str, np.ndarray]:
        """Partial volumes (csf, gm, wm, wmh, mask, ventricle) of the aged subject at template points ``q``.

        At spacings above 1 mm the maps are pre-blurred and every edge the atrophy and lesions add is a linear
        ramp one voxel wide: each value is (approximately) the average over an output voxel.
        """
        t, ramp = self._maps, self._ramp
        mask = np.clip(_sample(t.mask, q, t.origin_mm, 0.0), 0.0, 1.0)
        inside = mask > 0
        qi, mi = q[inside], mask[inside]  # the other maps are only needed inside the brain
        gm = _sample(t.gm, qi, t.origin_mm, 0.0)
        wm = _sample(t.wm, qi, t.origin_mm, 0.0)
        sd = _sample(t.ventricle_sd, qi, t.origin_mm, _SD_CLIP_MM)
        cortex = _sample(t.cortex_distance, qi, t.origin_mm, 0.0)

        ventricle = np.clip(0.5 + (p.ventricle_growth_mm - sd) / ramp, 0.0, 1.0) * mi
        gm = gm * (1.0 - ventricle)
        wm = wm * (1.0 - ventricle)
        if p.cortical_thinning_mm > 0:
            gm = gm * (1.0 - np.clip((p.cortical_thinning_mm - cortex) / ramp, 0.0, 1.0))
        wmh = wm * self._wmh_fraction(p, qi, sd, ramp)
        wm = wm - wmh
        csf = np.clip(mi - gm - wm - wmh, 0.0, None)
        out = {}
        for key, value in (("csf", csf), ("gm", gm), ("wm", wm), ("wmh", wmh), ("ventricle", ventricle)):
            out[key] = np.zeros(len(q))
            out[key][inside] = value
        out["mask"] = mask
        return out

    def volumes_ml(self, p: PhantomParameters) -> dict[str, float]:
        """Ventricle and WMH volumes (ml) of the subject, see the module docstring."""
        t = self.template
        ventricle = np.clip(0.5 + p.ventricle_growth_mm - t.ventricle_sd_voxels, 0.0, 1.0).sum() / 1000.0
        ventricle_pts = np.clip(0.5 + p.ventricle_growth_mm - t.wm_points_sd, 0.0, 1.0)
        h = self._wmh_fraction(p, t.wm_points_mm.astype(np.float64), t.wm_points_sd, 2.0)
        wmh = float((t.wm_points_wm * (1.0 - ventricle_pts) * h).sum()) * 8.0 / 1000.0
        return {
            "ventricle_volume_ml": float(ventricle) * p.volume_scale,
            "wmh_volume_ml": wmh * p.volume_scale,
        }

    # -- rendering ---------------------------------------------------------------------------------------------

    def _slice_tissue(self, p: PhantomParameters) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Partial volumes (S, H, W) on the output grid, and the voxel centres (S, H, W, 3)."""
        g = self.geometry
        x, y = g.in_plane_mm()
        z = g.slice_z_mm
        centres = np.stack(np.meshgrid(z, x, y, indexing="ij"), axis=-1)[..., [1, 2, 0]]  # (S, H, W, 3)
        flat = centres.reshape(-1, 3)
        linear = self._linear(p)
        q0 = (flat - _AFFINE_CENTRE_MM) @ linear.T + _AFFINE_CENTRE_MM - p.translation_mm
        displacement = _spline_grid(p.displacement_ctrl, (x, y, z), _CONTROL_BOX_MM, _CONTROL_SPACING_MM)
        q0 = q0 + displacement.transpose(3, 1, 2, 0).reshape(-1, 3)  # (x, y, z) grid -> (S, H, W) order
        tissue = self.tissue_at(p, q0)
        out = {k: v.reshape(centres.shape[:3]) for k, v in tissue.items()}
        return out, centres

    def _render(
        self, tissue: dict, intensity: dict, bias: np.ndarray, sigma: float, brain: np.ndarray, centres, rng
    ) -> np.ndarray:
        signal = sum(tissue[k] * intensity[k] for k in _TISSUES)
        field_ = np.exp(_bias_basis(centres.reshape(-1, 3)) @ bias).reshape(signal.shape)
        signal = signal * field_
        noisy = np.hypot(signal + rng.normal(0.0, sigma, signal.shape), rng.normal(0.0, sigma, signal.shape))
        values = noisy[brain]
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
        image = np.clip((noisy - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        image[~brain] = 0.0
        return image.astype(np.float32)

    def resample_t1(self, index: int, seed: int) -> np.ndarray:
        """T1w slices ``(S, H, W)`` of subject ``index`` with T1w contrast, bias field and noise drawn afresh.

        The anatomy, and so the FLAIR, are those of ``subject(index)``: the result is another T1w that is
        equally consistent with the subject's FLAIR. Comparing it with the real T1w measures how much of the
        T1w the FLAIR leaves undetermined, i.e. the best a FLAIR-to-T1w model that samples can score here.
        """
        p = self.parameters(index)
        tissue, centres = self._slice_tissue(p)
        rng = np.random.default_rng([int(seed), int(index)])
        t1, bias = self.intensity.draw_t1(rng, p.age), rng.normal(0.0, self.intensity.bias_std, 9)
        sigma = rng.uniform(*T1_NOISE_RANGE)
        return self._render(tissue, t1, bias, sigma, tissue["mask"] >= 0.5, centres, rng)

    def subject(self, index: int, age: float | None = None) -> PhantomSubject:
        """Render subject ``index`` (``age`` overrides its drawn age, every other draw is kept)."""
        p = self.parameters(index, age=age)
        noise_rng = self._streams(index)[3]
        tissue, centres = self._slice_tissue(p)
        brain = tissue["mask"] >= 0.5
        t1 = self._render(tissue, p.t1_intensity, p.bias_coefficients[0], p.noise_sigma[0], brain, centres, noise_rng)
        flair = self._render(
            tissue, p.flair_intensity, p.bias_coefficients[1], p.noise_sigma[1], brain, centres, noise_rng
        )
        volumes = self.volumes_ml(p)
        sid = subject_id(index)
        facts = {
            "subject": sid,
            "age": round(p.age, 2),
            "ventricle_volume_ml": round(volumes["ventricle_volume_ml"], 3),
            "wmh_volume_ml": round(volumes["wmh_volume_ml"], 3),
            "ventricle_growth_mm": round(p.ventricle_growth_mm, 3),
            "cortical_thinning_mm": round(p.cortical_thinning_mm, 3),
            "ventricle_size": ventricle_size_word(volumes["ventricle_volume_ml"]),
        }
        g = self.geometry
        slice_facts, captions = [], []
        for s, z in enumerate(g.slice_z_mm):
            total = max(float(tissue["mask"][s].sum()), 1e-6)
            gm = float(tissue["gm"][s].sum()) / total
            wm = float(tissue["wm"][s].sum() + tissue["wmh"][s].sum()) / total
            slice_facts.append(
                {
                    "slice_index": s,
                    "slice_z_mm": round(float(z), 3),
                    "gm_fraction": round(gm, 4),
                    "wm_fraction": round(wm, 4),
                    "csf_fraction": round(max(0.0, 1.0 - gm - wm), 4),
                }
            )
            captions.append(build_caption(p.age, volumes["ventricle_volume_ml"]))
        return PhantomSubject(
            subject_id=sid,
            t1=t1,
            flair=flair,
            affines=np.stack([g.slice_affine(s) for s in range(g.num_slices)]),
            facts=facts,
            slice_facts=slice_facts,
            captions=captions,
            tissue={k: tissue[k].astype(np.float32) for k in _TISSUES},
            brain_mask=brain,
            parameters=p,
        )


# ---------------------------------------------------------------------------------------------------------------
# Dataset writer

_IMAGE_RE = re.compile(r"^sub-\d+_slice-\d+_(T1w|FLAIR)\.nii\.gz$")


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    img.set_sform(affine, code=4)  # MNI 152
    img.set_qform(affine, code=4)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_phantom_dataset(
    output_dir,
    num_subjects: int,
    geometry: PhantomGeometry,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
    intensity: str = "ukbiobank",
    extra_training_subjects: int = 0,
) -> Path:
    """Write ``num_subjects`` phantoms as 2D NIfTI slices and a MONAI decathlon-style ``datalist.json``.

    Files: ``output_dir/images/sub-0007_slice-2_T1w.nii.gz`` and ``..._FLAIR.nii.gz`` (H, W) float32 with the
    slice's MNI affine; ``output_dir/datalist.json`` with ``training`` / ``validation`` / ``test`` lists split
    by subject (deterministic from ``seed``), one entry per slice with relative image paths, the caption and the
    ground-truth facts; ``intensity`` names the :data:`INTENSITY_MODELS` entry (recorded in the datalist). Every file is written atomically; stale phantom images of an earlier run in
    ``images/`` are removed. Returns the datalist path.

    ``extra_training_subjects`` more subjects (indices from ``num_subjects`` on) all go to training: a larger
    training set whose validation and test subjects, and every image of the first ``num_subjects``, are those of
    the data set made without them.
    """
    from tqdm.auto import tqdm

    num_subjects = int(num_subjects)
    intensity_model(intensity)  # an unknown name fails before anything is written
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    extra = extra_training_subjects
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra_training_subjects must be an integer >= 0, got {extra_training_subjects!r}")
    output_dir = Path(output_dir)
    splits = split_generated_subjects(num_subjects, val_fraction, test_fraction, seed, noun="subjects")
    splits["training"] = list(splits["training"]) + list(range(num_subjects, num_subjects + extra_training_subjects))
    split_of = {i: name for name, ids in splits.items() for i in ids}
    generator = BrainPhantomGenerator(geometry, seed=seed, intensity=intensity)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list] = {"training": [], "validation": [], "test": []}
    written: set[str] = set()
    total = num_subjects + extra_training_subjects
    for index in tqdm(range(total), desc="brain phantoms", unit="subject", disable=not progress):
        subj = generator.subject(index)
        for s, sf in enumerate(subj.slice_facts):
            stem = f"{subj.subject_id}_slice-{s}"
            names = {"image": f"{stem}_T1w.nii.gz", "flair": f"{stem}_FLAIR.nii.gz"}
            _save_nifti(image_dir / names["image"], subj.t1[s], subj.affines[s])
            _save_nifti(image_dir / names["flair"], subj.flair[s], subj.affines[s])
            written.update(names.values())
            entries[split_of[index]].append(
                {
                    "image": f"images/{names['image']}",
                    "flair": f"images/{names['flair']}",
                    "caption": subj.captions[s],
                    "subject": subj.subject_id,
                    "age": subj.facts["age"],
                    "ventricle_volume_ml": subj.facts["ventricle_volume_ml"],
                    "gm_fraction": sf["gm_fraction"],
                    "wm_fraction": sf["wm_fraction"],
                    "csf_fraction": sf["csf_fraction"],
                    "wmh_volume_ml": subj.facts["wmh_volume_ml"],
                    "slice_index": sf["slice_index"],
                    "slice_z_mm": sf["slice_z_mm"],
                }
            )
    for stale in image_dir.iterdir():
        if _IMAGE_RE.match(stale.name) and stale.name not in written:
            stale.unlink()
    datalist = {
        "description": (
            "Synthetic brain MRI phantoms (T1w + FLAIR axial slices) from the MNI152 2009 templates, with age-driven "
            "atrophy and white-matter hyperintensities; demonstration data with known ground truth, not real "
            "subjects. Ventricle words: small < "
            f"{VENTRICLE_SMALL_MAX_ML:g} ml <= medium < {VENTRICLE_LARGE_MIN_ML:g} ml <= large."
        ),
        "generator": "common.data.brain_phantoms",
        "geometry": geometry.to_dict(),
        "seed": int(seed),
        "intensity_model": intensity,
        "num_subjects": num_subjects,
        "extra_training_subjects": extra_training_subjects,
        "modality": {"image": "T1w", "flair": "FLAIR"},
        "ventricle_thresholds_ml": {"small_max": VENTRICLE_SMALL_MAX_ML, "large_min": VENTRICLE_LARGE_MIN_ML},
        "subjects": {name: [subject_id(i) for i in ids] for name, ids in splits.items()},
        **entries,
    }
    path = output_dir / "datalist.json"
    write_json(path, datalist)
    return path
