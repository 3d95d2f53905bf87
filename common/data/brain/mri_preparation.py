"""Preparation of real brain MRI (UK Biobank layout) into a 2D slice data set of T1w (and FLAIR) axial slices.

What "Controllable Medical Image Generation with ControlNets" trained on: registered (MNI) brain-extracted
T1-weighted volumes, optionally with the matching FLAIR, turned into 2D axial slices of 160 x 224 in [0, 1].

Input layout (both glob patterns configurable, relative to ``input_dir``)::

    <input_dir>/<subject>/T1/T1_brain_to_MNI.nii.gz
    <input_dir>/<subject>/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz

The subject id is the first folder below ``input_dir``; for a flat layout (pattern ``*_T1w.nii.gz``) it is
the file name without the pattern's fixed ending (``sub01_T1w.nii.gz`` -> ``sub01``). T1w and FLAIR
are paired by subject id.

Per volume, with array axes (x, y, z) where (x, y) is the axial plane and z the inferior-superior axis:

0. with ``spacing``, resampling to that voxel size (MONAI ``Spacing``, trilinear; the axis order and directions are
   kept), so that data at 1 mm feed a model trained at 2 mm at the right scale;
1. min-max scaling of the whole volume to [0, 1] (float32); FLAIR scaled on its own;
2. choice of ``num_slices`` axial slices ``slice_step`` apart around a centre slice; the centre is
   ``z = Z // 2``, the middle of the volume (``slice_center="volume"``, default: for MNI-registered data the
   same anatomical level in every subject), or the intensity centre of mass along z
   (``slice_center="mass"``, for data whose brains are not centred); FLAIR uses the T1w's slices;
3. centre crop of (x, y) to ``target_shape`` (default 160 x 224), zero-padding an axis that is smaller
   (MONAI ``CenterSpatialCrop`` / symmetric ``SpatialPad`` convention);
4. each slice written as a 2D NIfTI of shape (H, W) = (x, y), float32, whose affine is the volume's affine
   moved to the crop origin and to the slice: it carries the in-plane spacing, the slice thickness (third
   column) and the slice's world position.

Outputs under ``output_dir``: ``images/<subject>_slice-<z>_T1w.nii.gz`` (and ``_FLAIR``), and
``datalist.json`` in MONAI decathlon style, split by subject. Nothing is written half-way: slices are
written into a hidden staging folder that becomes ``images/`` only when every subject succeeded, then
``datalist.json`` is written (atomically).
"""

from __future__ import annotations

import logging
import numbers
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.data.splits import split_subjects
from common.io.atomic import atomic_path, write_json

__all__ = [
    "DEFAULT_T1_PATTERN",
    "DEFAULT_FLAIR_PATTERN",
    "DEFAULT_CAPTION",
    "DEFAULT_TARGET_SHAPE",
    "DataPreparationError",
    "SubjectFiles",
    "VolumeHeader",
    "PreparationResult",
    "discover_subjects",
    "read_header",
    "load_volume",
    "minmax_normalise",
    "select_slices",
    "crop_or_pad_offsets",
    "crop_or_pad_xy",
    "slice_affine",
    "prepare_brain_mri",
]

logger = logging.getLogger(__name__)

DEFAULT_T1_PATTERN = "*/T1/T1_brain_to_MNI.nii.gz"
DEFAULT_FLAIR_PATTERN = "*/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz"
DEFAULT_CAPTION = "T1-weighted image of a brain."
DEFAULT_TARGET_SHAPE = (160, 224)
SLICE_CENTERS = ("volume", "mass")
SPLITS = ("training", "validation", "test")


class DataPreparationError(ValueError):
    """Bad input for the preparation (missing files, wrong shapes or values, occupied output folder)."""


@dataclass(frozen=True)
class SubjectFiles:
    """The volumes of one subject: its T1w and, when FLAIR is paired, its FLAIR."""

    subject: str
    t1: Path
    flair: Path | None = None


@dataclass(frozen=True)
class VolumeHeader:
    """What the header says about a volume, after the optional reorientation: shape (X, Y, Z), 4x4 affine."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray


@dataclass
class PreparationResult:
    """Summary of a preparation run."""

    output_dir: Path
    datalist_path: Path
    splits: dict[str, list[str]]  # split name -> subject ids
    num_slices_written: int  # number of datalist entries (T1w slices; FLAIR slices pair with them)
    skipped: list[str] = field(default_factory=list)  # one message per skipped subject


# --------------------------------------------------------------------------------------------------- discovery


def _literal_tail(pattern: str) -> str:
    """Fixed ending of a glob pattern's last component: ``*_T1w.nii.gz`` -> ``_T1w.nii.gz``."""
    name = pattern.replace("\\", "/").rsplit("/", 1)[-1]
    cut = max(name.rfind(c) for c in "*?]")
    return name[cut + 1 :]


def _subject_id(path: Path, root: Path, pattern: str) -> str:
    rel = path.relative_to(root)
    if len(rel.parts) > 1:
        return rel.parts[0]
    tail = _literal_tail(pattern)
    name = rel.name
    if tail and name.endswith(tail) and len(name) > len(tail):
        return name[: -len(tail)]
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _match(root: Path, pattern: str, what: str) -> dict[str, Path]:
    if not pattern or Path(pattern).is_absolute():
        raise DataPreparationError(
            f"the {what} pattern must be a glob relative to the input directory, got {pattern!r}"
        )
    found: dict[str, Path] = {}
    for path in sorted(p for p in root.glob(pattern) if p.is_file()):
        subject = _subject_id(path, root, pattern)
        if subject in found:
            raise DataPreparationError(
                f"subject {subject!r} has more than one {what} volume matching {pattern!r}: {found[subject]} and "
                f"{path}; make the pattern select one volume per subject"
            )
        found[subject] = path
    return found


def discover_subjects(
    input_dir: str | os.PathLike,
    t1_pattern: str = DEFAULT_T1_PATTERN,
    flair_pattern: str | None = None,
    strict: bool = False,
) -> tuple[list[SubjectFiles], list[str]]:
    """Find the subjects under ``input_dir``, sorted by id; pair each T1w with its FLAIR if ``flair_pattern``.

    Returns ``(subjects, skipped)``: a subject without FLAIR is left out with a message in ``skipped``, or
    raises ``DataPreparationError`` naming all of them when ``strict``. Raises too if the folder is missing,
    nothing matches ``t1_pattern`` (or no subject is left), or a subject matches twice.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise DataPreparationError(f"input directory not found: {root}")
    t1 = _match(root, t1_pattern, "T1w")
    if not t1:
        raise DataPreparationError(f"no T1w volume matches the pattern {t1_pattern!r} under {root}")
    if flair_pattern is None:
        return [SubjectFiles(s, p) for s, p in sorted(t1.items())], []
    flair = _match(root, flair_pattern, "FLAIR")
    missing = [s for s in sorted(t1) if s not in flair]
    if missing and strict:
        raise DataPreparationError(
            f"{len(missing)} subject(s) have no FLAIR matching {flair_pattern!r}: {', '.join(missing)}"
        )
    skipped = [f"subject {s!r}: no FLAIR matching {flair_pattern!r}, skipped" for s in missing]
    subjects = [SubjectFiles(s, p, flair[s]) for s, p in sorted(t1.items()) if s in flair]
    if not subjects:
        raise DataPreparationError(f"no subject has both a T1w ({t1_pattern!r}) and a FLAIR ({flair_pattern!r}) volume")
    return subjects, skipped


# --------------------------------------------------------------------------------------------------- volumes


def _reorientation(affine: np.ndarray, axcodes: str | None) -> np.ndarray | None:
    if axcodes is None:
        return None
    current = nib.orientations.io_orientation(affine)
    wanted = nib.orientations.axcodes2ornt(tuple(axcodes))
    transform = nib.orientations.ornt_transform(current, wanted)
    return None if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]) else transform


def read_header(path: str | os.PathLike, axcodes: str | None = None) -> VolumeHeader:
    """Read shape and affine of a 3D NIfTI without loading its data, as they will be after reorienting.

    A trailing singleton 4th dimension is accepted. Raises ``DataPreparationError`` if the file cannot be read,
    is not 3D, or its third array axis is not the inferior-superior axis (axial slices need it; reorient
    with ``axcodes``, e.g. ``"RAS"``).
    """
    path = Path(path)
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DataPreparationError(f"cannot read {path} as NIfTI: {e}") from e
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataPreparationError(f"volume is not 3D: {path} has shape {tuple(img.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    transform = _reorientation(affine, axcodes)
    if transform is not None:
        affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
        new_shape = [0, 0, 0]
        for axis, (target, _) in enumerate(transform):
            new_shape[int(target)] = shape[axis]
        shape = tuple(new_shape)
    codes = nib.aff2axcodes(affine)
    if codes[2] not in ("S", "I"):
        raise DataPreparationError(
            f"array axis 2 of {path} is not the inferior-superior axis (orientation {''.join(codes)}), so its "
            "slices would not be axial; reorient with axcodes='RAS' (or 'LAS')"
        )
    return VolumeHeader(path, shape, affine)  # type: ignore[arg-type]


def load_volume(path: str | os.PathLike, axcodes: str | None = None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Load a 3D volume as float32 array (X, Y, Z), its 4x4 affine and its header, reoriented to ``axcodes``.

    Raises ``DataPreparationError`` if it is not 3D, has non-finite values, or is constant.
    """
    path = Path(path)
    header = read_header(path, axcodes)
    img = nib.load(path)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    data = data.reshape(data.shape[:3]) if data.ndim == 4 else data
    transform = _reorientation(np.asarray(img.affine, dtype=np.float64), axcodes)
    if transform is not None:
        data = nib.orientations.apply_orientation(data, transform)
    data = np.ascontiguousarray(data, dtype=np.float32)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataPreparationError(f"{path} has {bad} non-finite voxel value(s) (NaN or inf)")
    if float(data.max()) == float(data.min()):
        raise DataPreparationError(f"{path} is constant ({float(data.min())}); it cannot be min-max scaled")
    return data, header.affine, img.header


# --------------------------------------------------------------------------------------------------- transforms


def minmax_normalise(volume: np.ndarray) -> np.ndarray:
    """Scale an array of any shape linearly to [0, 1] (float32) from its own min and max."""
    lo, hi = float(volume.min()), float(volume.max())
    if hi <= lo:
        raise DataPreparationError("cannot min-max scale a constant volume")
    out = (volume.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def select_slices(volume: np.ndarray, num_slices: int = 5, step: int = 1, center: str = "volume") -> list[int]:
    """Indices along z of ``num_slices`` axial slices ``step`` apart around the centre slice of ``volume`` (X, Y, Z).

    ``center="volume"``: the centre is ``Z // 2``. ``center="mass"``: the intensity centre of mass along z
    (intensities shifted to be non-negative), rounded. For an even count the extra slice is below the centre.
    The centre is moved inwards if needed so that every slice lies in the volume; raises if the span is
    longer than the volume.
    """
    if center not in SLICE_CENTERS:
        raise DataPreparationError(f"slice_center must be one of {SLICE_CENTERS}, got {center!r}")
    depth = volume.shape[2]
    offsets = (np.arange(num_slices) - num_slices // 2) * step
    if offsets[-1] - offsets[0] + 1 > depth:
        raise DataPreparationError(f"{num_slices} slices {step} apart do not fit in a volume of {depth} slices")
    if center == "volume":
        middle = depth // 2
    else:
        weights = volume.astype(np.float64) - float(volume.min())
        profile = weights.sum(axis=(0, 1))
        middle = int(round(float((profile * np.arange(depth)).sum() / profile.sum())))
    middle = int(np.clip(middle, -offsets[0], depth - 1 - offsets[-1]))
    return [int(middle + o) for o in offsets]


def crop_or_pad_offsets(size: Sequence[int], target: Sequence[int]) -> tuple[int, ...]:
    """Per axis, the input index of output index 0 of a centre crop / symmetric pad (negative when padding)."""
    return tuple((s - t) // 2 if s >= t else -((t - s) // 2) for s, t in zip(size, target, strict=True))


def crop_or_pad_xy(array: np.ndarray, target: Sequence[int]) -> np.ndarray:
    """Centre-crop or zero-pad the first two axes of ``array`` (X, Y, ...) to ``target`` (H, W) -> (H, W, ...)."""
    out = np.zeros((*target, *array.shape[2:]), dtype=array.dtype)
    src, dst = [], []
    for s, t, off in zip(array.shape[:2], target, crop_or_pad_offsets(array.shape[:2], target), strict=True):
        if off >= 0:  # crop
            src.append(slice(off, off + t))
            dst.append(slice(0, t))
        else:  # pad
            src.append(slice(0, s))
            dst.append(slice(-off, -off + s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def slice_affine(affine: np.ndarray, offsets: Sequence[int], z_index: int) -> np.ndarray:
    """4x4 affine of a cropped axial slice: voxel (i, j, 0) of the slice is voxel (i + ox, j + oy, z) of the volume."""
    shift = np.eye(4)
    shift[:3, 3] = (offsets[0], offsets[1], z_index)
    return np.asarray(affine, dtype=np.float64) @ shift


def _slice_image(data: np.ndarray, affine: np.ndarray, source_header: nib.Nifti1Header) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    sform_code = int(source_header["sform_code"]) if "sform_code" in source_header else 0
    qform_code = int(source_header["qform_code"]) if "qform_code" in source_header else 0
    img.set_sform(affine, code=sform_code or 2)
    img.set_qform(affine, code=qform_code or sform_code or 2)
    img.header.set_xyzt_units("mm")
    return img


# --------------------------------------------------------------------------------------------------- split


# --------------------------------------------------------------------------------------------------- pipeline


def _check_output_dir(output_dir: Path, input_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise DataPreparationError(f"output path exists and is not a directory: {output_dir}")
    out, inp = output_dir.resolve(), input_dir.resolve()
    if out == inp or out in inp.parents:
        raise DataPreparationError(
            f"the output directory {output_dir} must not contain the input directory {input_dir}"
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise DataPreparationError(
            f"output directory {output_dir} exists and is not empty; pass --overwrite to replace its images/ and "
            "datalist.json"
        )


def _as_shape(value: Any) -> tuple[int, ...]:
    """``(160, 224)``, ``[160, 224]`` or ``"160,224"`` -> ``(160, 224)``; raises on anything else."""
    items = value.replace("x", ",").split(",") if isinstance(value, str) else value
    try:
        shape = tuple(int(v) for v in items)
        if any(float(v) != s for v, s in zip(items, shape, strict=True)):
            raise ValueError
    except (TypeError, ValueError) as e:
        raise DataPreparationError(f"target_shape must be two positive integers (H, W), got {value!r}") from e
    return shape


def _as_spacing(spacing: Any) -> tuple[float, float, float] | None:
    """``None``, one positive number (isotropic) or three, as a 3-tuple of mm."""
    if spacing is None:
        return None
    values = [spacing] if isinstance(spacing, numbers.Real) else list(spacing)
    if isinstance(spacing, bool) or len(values) not in (1, 3):
        raise DataPreparationError(f"spacing must be one number or three (mm), got {spacing!r}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) and v > 0 for v in values):
        raise DataPreparationError(f"spacing must be positive finite numbers (mm), got {spacing!r}")
    values = values * 3 if len(values) == 1 else values
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _check_arguments(
    num_slices: int, slice_step: int, slice_center: str, target_shape: Sequence[int], caption: str
) -> None:
    if not isinstance(num_slices, numbers.Integral) or isinstance(num_slices, bool) or num_slices < 1:
        raise DataPreparationError(f"num_slices must be a positive integer, got {num_slices!r}")
    if not isinstance(slice_step, numbers.Integral) or isinstance(slice_step, bool) or slice_step < 1:
        raise DataPreparationError(f"slice_step must be a positive integer, got {slice_step!r}")
    if slice_center not in SLICE_CENTERS:
        raise DataPreparationError(f"slice_center must be one of {SLICE_CENTERS}, got {slice_center!r}")
    if len(target_shape) != 2 or any(not isinstance(s, int) or s < 1 for s in target_shape):
        raise DataPreparationError(f"target_shape must be two positive integers (H, W), got {target_shape!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise DataPreparationError("caption must be a non-empty string")


def resample_volume(data: np.ndarray, affine: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (X, Y, Z) resampled to voxels of ``spacing`` mm (trilinear), axis order and directions kept."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    resampled = Spacing(pixdim=tuple(float(s) for s in spacing), mode="bilinear", padding_mode="zeros")(
        MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    )
    return np.ascontiguousarray(resampled[0].numpy(), dtype=np.float32), np.asarray(resampled.affine, dtype=np.float64)


def _depth_after(header: VolumeHeader, spacing: Sequence[float] | None) -> int:
    if spacing is None:
        return header.shape[2]
    thickness = float(np.sqrt((header.affine[:3, 2] ** 2).sum()))
    return int(round(header.shape[2] * thickness / float(spacing[2])))


def _preflight(
    subjects: list[SubjectFiles],
    axcodes: str | None,
    num_slices: int,
    slice_step: int,
    spacing: Sequence[float] | None = None,
) -> dict[str, VolumeHeader]:
    """Check every header before anything is written: 3D, axial, tall enough, FLAIR on the T1w's grid."""
    headers = {}
    span = (num_slices - 1) * slice_step + 1
    for s in subjects:
        t1 = read_header(s.t1, axcodes)
        if (depth := _depth_after(t1, spacing)) < span:
            raise DataPreparationError(
                f"subject {s.subject!r}: {s.t1} has {depth} axial slices{' after resampling' if spacing else ''}, "
                f"fewer than the {span} that {num_slices} slices {slice_step} apart need"
            )
        if s.flair is not None:
            flair = read_header(s.flair, axcodes)
            if flair.shape != t1.shape:
                raise DataPreparationError(
                    f"subject {s.subject!r}: T1w shape {t1.shape} ({s.t1}) and FLAIR shape {flair.shape} ({s.flair}) "
                    "differ; both must be registered to the same grid"
                )
            if not np.allclose(flair.affine, t1.affine, atol=1e-2):
                raise DataPreparationError(
                    f"subject {s.subject!r}: T1w ({s.t1}) and FLAIR ({s.flair}) have different affines; both must "
                    "be registered to the same grid"
                )
        headers[s.subject] = t1
    return headers


def _write_slice(path: Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> None:
    with atomic_path(path) as tmp:
        nib.save(_slice_image(data, affine, header), tmp)


@contextmanager
def staging_folder(output_dir: Path) -> Iterator[Path]:
    """A hidden folder in ``output_dir`` (created if needed) for the slices; on failure it goes, with an ``output_dir``
    this call created, so a failed run leaves nothing behind. :func:`publish_slices` turns it into ``images/``."""
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".images.partial-", dir=output_dir))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def publish_slices(output_dir: Path, staging: Path, datalist: dict[str, Any]) -> Path:
    """Swap ``staging`` in as ``images/`` and write ``datalist.json``; an older ``images/`` goes only after both."""
    images_dir = output_dir / "images"
    old = None
    if images_dir.exists():
        old = output_dir / f".images.old-{uuid.uuid4().hex}"
        images_dir.rename(old)
    staging.rename(images_dir)
    datalist_path = output_dir / "datalist.json"
    write_json(datalist_path, datalist)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return datalist_path


def prepare_brain_mri(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    with_flair: bool = False,
    t1_pattern: str = DEFAULT_T1_PATTERN,
    flair_pattern: str = DEFAULT_FLAIR_PATTERN,
    num_slices: int = 5,
    slice_step: int = 1,
    slice_center: str = "volume",
    target_shape: Sequence[int] = DEFAULT_TARGET_SHAPE,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    caption: str = DEFAULT_CAPTION,
    axcodes: str | None = None,
    spacing: float | Sequence[float] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PreparationResult:
    """Turn registered 3D brain volumes into 2D axial slices (H, W) = ``target_shape`` and a split datalist.

    See the module docstring for the processing. Every check that needs no voxel data runs before anything is
    written (arguments, input folder and matches, FLAIR pairing, headers: 3D, axial, depth, T1w/FLAIR grids,
    output folder); voxel checks (non-finite, constant) run as each volume is read, and a failure there removes
    everything this run wrote. ``axcodes`` (e.g. ``"RAS"``) reorients volumes first; by default they are used as
    stored (UK Biobank MNI volumes are LAS). ``spacing`` (mm, one value for isotropic voxels or three) resamples
    every volume first; by default volumes keep their voxels. ``overwrite`` allows a non-empty ``output_dir``: its ``images/``
    and ``datalist.json`` are replaced once the new ones are complete, other files are left alone.

    ``datalist.json``: ``{"description", "preparation": {settings}, "training", "validation", "test"}``, each
    split a list of ``{"image", ["flair",] "caption", "subject", "slice_index", "slice_z_mm"}`` with paths
    relative to ``output_dir``; ``slice_index`` is the z index in the source volume, ``slice_z_mm`` the world
    z coordinate (mm) of the slice centre.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    target_shape = _as_shape(target_shape)
    _check_arguments(num_slices, slice_step, slice_center, target_shape, caption)
    spacing = _as_spacing(spacing)
    try:
        split_subjects([], val_fraction, test_fraction, seed)  # validates the fractions before any work
    except ValueError as err:
        raise DataPreparationError(str(err)) from err
    subjects, skipped = discover_subjects(input_dir, t1_pattern, flair_pattern if with_flair else None, strict)
    for message in skipped:
        logger.warning(message)
    _check_output_dir(output_dir, input_dir, overwrite)
    _preflight(subjects, axcodes, num_slices, slice_step, spacing)
    splits = split_subjects([s.subject for s in subjects], val_fraction, test_fraction, seed)

    entries: dict[str, list[dict[str, Any]]] = {}
    with staging_folder(output_dir) as staging:
        for s in tqdm(subjects, desc="Preparing brain MRI", unit="subject", disable=not progress):
            t1, affine, header = load_volume(s.t1, axcodes)
            if spacing is not None:
                t1, affine = resample_volume(t1, affine, spacing)
            t1 = minmax_normalise(t1)
            indices = select_slices(t1, num_slices, slice_step, slice_center)
            offsets = crop_or_pad_offsets(t1.shape[:2], target_shape)
            t1_slices = crop_or_pad_xy(t1[:, :, indices], target_shape)  # (H, W, num_slices)
            flair_slices = flair_header = None
            if s.flair is not None:
                flair, flair_affine, flair_header = load_volume(s.flair, axcodes)
                if spacing is not None:
                    flair, flair_affine = resample_volume(flair, flair_affine, spacing)
                flair_slices = crop_or_pad_xy(minmax_normalise(flair)[:, :, indices], target_shape)
            centre = np.array([(target_shape[0] - 1) / 2, (target_shape[1] - 1) / 2, 0.0, 1.0])
            subject_entries = []
            for n, k in enumerate(indices):
                aff = slice_affine(affine, offsets, k)
                name = f"{s.subject}_slice-{k}"
                _write_slice(staging / f"{name}_T1w.nii.gz", t1_slices[..., n], aff, header)
                entry: dict[str, Any] = {"image": f"images/{name}_T1w.nii.gz"}
                if flair_slices is not None:
                    flair_aff = slice_affine(flair_affine, offsets, k)
                    _write_slice(staging / f"{name}_FLAIR.nii.gz", flair_slices[..., n], flair_aff, flair_header)
                    entry["flair"] = f"images/{name}_FLAIR.nii.gz"
                entry.update(
                    caption=caption,
                    subject=s.subject,
                    slice_index=k,
                    slice_z_mm=round(float((aff @ centre)[2]), 4),
                )
                subject_entries.append(entry)
            entries[s.subject] = subject_entries

    datalist: dict[str, Any] = {
        "description": (
            f"{len(subjects)} subjects from {input_dir}: {num_slices} axial slices {slice_step} apart around the "
            f"{'middle of the volume' if slice_center == 'volume' else 'centre of mass along z'}, centre-cropped/"
            f"padded to {target_shape[0]}x{target_shape[1]}, min-max scaled to [0, 1] per volume; split by subject "
            f"(seed {seed}, validation {val_fraction}, test {test_fraction})."
        ),
        "preparation": {
            "tool": "tools/prepare_brain_mri.py",
            "input_dir": str(input_dir.resolve()),
            "t1_pattern": t1_pattern,
            "flair_pattern": flair_pattern if with_flair else None,
            "num_slices": num_slices,
            "slice_step": slice_step,
            "slice_center": slice_center,
            "target_shape": list(target_shape),
            "axcodes": axcodes,
            "spacing_mm": None if spacing is None else list(spacing),
            "intensity": "min-max per volume to [0, 1]",
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "num_subjects": {split: len(ids) for split, ids in splits.items()},
            "skipped": skipped,
        },
    }
    for split in SPLITS:
        datalist[split] = [entry for subject in splits[split] for entry in entries[subject]]
    datalist_path = publish_slices(output_dir, staging, datalist)
    return PreparationResult(
        output_dir=output_dir,
        datalist_path=datalist_path,
        splits=splits,
        num_slices_written=sum(len(e) for e in entries.values()),
        skipped=skipped,
    )
