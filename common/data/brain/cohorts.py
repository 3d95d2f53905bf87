"""Preparation of public healthy-brain cohorts (IXI, OASIS-1, HCP Young Adult) into 2D slices with per-subject facts.

Same processing and output layout as :mod:`common.data.brain.mri_preparation` (UK Biobank), whose functions do the
work: each T1w volume is min-max scaled to [0, 1], ``num_slices`` slices ``slice_step`` apart are taken around the
middle of the volume (or the intensity centre of mass), centre-cropped / zero-padded to ``target_shape`` (default
160 x 224) and written as 2D NIfTI; ``datalist.json`` lists them split by subject
(:func:`common.data.splits.split_subjects`). Only subjects known to be healthy are kept, and every entry carries the
``facts`` that captions can be built from.

Cohorts
-------
``ixi``: IXI (brain-development.org), about 580 healthy adults aged 20-86 scanned at three London hospitals.
    Images: ``IXI002-Guys-0828-T1.nii.gz`` in one folder; subject ``IXI002``, site ``Guys``, ``HH`` or ``IOP`` from
    the name (null when a renamed file drops it). These are raw scanner volumes, neither skull-stripped nor registered:
    strip and register them first (see Registration) and point ``t1_pattern`` at the results.
    Demographics: ``IXI.xls`` (Excel 97 .xls, first sheet "Table"; read with xlrd) or a CSV export of that sheet.
    Columns used: ``IXI_ID`` (a number: 2 for IXI002), ``SEX_ID (1=m, 2=f)``, ``AGE`` (decimal years, blank for some).
    A 0 code means missing. Some ids have two rows: they are merged field by field (a blank never overrides a value);
    two different values leave that field null, with a warning.
``oasis1``: OASIS-1 cross-sectional (oasis-brains.org), 416 adults aged 18-96, 100 of those over 60 with early
    Alzheimer's disease (CDR 0.5 to 2).
    Images: ``OAS1_0001_MR1/PROCESSED/MPRAGE/T88_111/OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img`` (Analyze 7.5
    .img/.hdr pair, read by nibabel): the average of the session's 3-4 MPRAGE scans (``n4``; ``n3`` for some, hence the
    ``*`` in the default pattern), gain-field corrected, registered to the atlas and brain-masked, 176 x 208 x 176 at
    1 mm. The atlas space is the Talairach-Tournoux 1988 space (Buckner et al. 2004), NOT MNI: this cohort's grid is
    ``t88``, its facts say ``"space": "Talairach-T88"``, and since MNI brains are larger than Talairach ones, the same
    slice index cuts a slightly different level than in the MNI cohorts. For one common space, register the images to
    MNI (see Registration) and pass ``template="mni152"``. Analyze headers hold no orientation: nibabel reads them as
    LAS (how OASIS stored these images) with the volume centre at 0 mm unless the header sets an SPM origin, so the
    slice positions of this cohort are relative to that centre, not Talairach coordinates.
    Demographics: ``oasis_cross-sectional.csv``, columns ``ID, M/F, Hand, Age, Educ, SES, MMSE, CDR, eTIV, nWBV, ASF,
    Delay``; ``ID`` names the session (``OAS1_0001_MR1``). Healthy means CDR 0 or CDR blank: OASIS left Educ, SES,
    MMSE and CDR blank for most participants under 60, who were recruited as nondemented, so a blank CDR counts as
    healthy. Sessions rated CDR 0.5, 1 or 2 (very mild, mild, moderate dementia) are skipped and counted. Only the
    first session of a person is used: the ``_MR2`` reliability rescans repeat the same brain within 90 days.
``hcp``: HCP Young Adult (S1200 release), healthy adults aged 22-37.
    Images: ``<subject>/MNINonLinear/T1w_restore_brain.nii.gz``: bias-corrected, brain-extracted and nonlinearly
    registered to MNI152 by the HCP minimal preprocessing pipelines, at 0.7 mm (260 x 311 x 260, the 182 x 218 x 182 mm
    MNI box): pass ``spacing=1`` to resample them to 1 mm (the grid check refuses them otherwise).
    Demographics: the unrestricted behavioural CSV (``unrestricted_<user>_<date>.csv``), columns ``Subject``,
    ``Gender`` (M/F) and ``Age``, a range (``22-25``, ``26-30``, ``31-35``, ``36+``; exact ages are restricted data).
    Facts keep the range and its midpoint as the age (the open range ``36+`` gives its lower end, 36).

A volume without a row in the demographics file is skipped with a warning and counted (``strict=True`` refuses
instead): the facts of every kept subject come from the file.

Registration (done beforehand; this module never registers or skull-strips)
---------------------------------------------------------------------------
Every volume must already lie on the template grid: by default FSL's MNI152 1 mm grid, 182 x 218 x 182 voxels of
1 mm stored LAS (the grid of ``MNI152_T1_1mm_brain.nii.gz`` in ``$FSLDIR/data/standard`` and of UK Biobank's
``T1_brain_to_MNI``). Volumes are reoriented to LAS (a lossless flip or axis swap), then, before anything is
written, each is refused if its axes are oblique, its field of view (voxels x voxel size) differs from the
template's by more than 3 % on an axis, or (unless ``spacing`` resamples it) its voxels differ from the template's
by more than 5 %. The error names each file, what it found and how to fix it. Raw IXI T1s fail this check (scanner
space, about 256 x 256 x 150 voxels of 0.94 x 0.94 x 1.2 mm); HCP ``MNINonLinear`` volumes pass with ``spacing=1``; OASIS T88 volumes pass on the
``t88`` grid. The check sees the grid, not the anatomy: a volume resampled onto the template grid without
registration would pass, so run the steps below, for instance::

    # 1. skull-strip the raw T1 (SynthStrip from FreeSurfer, or HD-BET)
    mri_synthstrip -i IXI002-Guys-0828-T1.nii.gz -o IXI002-Guys-0828_T1_brain.nii.gz
    hd-bet -i IXI002-Guys-0828-T1.nii.gz -o IXI002-Guys-0828_T1_brain.nii.gz
    # 2. register the brain to the MNI152 1 mm brain template (ANTs: affine + SyN deformation)
    antsRegistrationSyNQuick.sh -d 3 -f MNI152_T1_1mm_brain.nii.gz -m IXI002-Guys-0828_T1_brain.nii.gz -o IXI002_
    #    IXI002_Warped.nii.gz is the registered brain on the template grid; keep it under a name of its own
    mv IXI002_Warped.nii.gz IXI002-Guys-0828_T1_mni_brain.nii.gz
    # 3. to bring another image of that subject (a mask, a T2) onto the same grid, apply the same transforms
    antsApplyTransforms -d 3 -i IN.nii.gz -r MNI152_T1_1mm_brain.nii.gz \\
        -t IXI002_1Warp.nii.gz -t IXI002_0GenericAffine.mat -o IN_mni.nii.gz

then prepare with ``t1_pattern="{subject}_T1_mni_brain.nii.gz"`` (keeping ``IXI002-Guys-0828`` in the name keeps the
site). ``-t a`` instead of the default ``-t s`` of ``antsRegistrationSyNQuick.sh`` gives an affine-only registration.

Patterns
--------
``t1_pattern`` is a path relative to ``input_dir`` in which ``{subject}`` stands for the part of the path that names
the subject (one folder or file-name part, no ``/``); ``*`` and ``?`` are wildcards within one path component. The
same ``{subject}`` may appear twice (the OASIS default does).

Outputs
-------
Under ``output_dir``: ``images/<subject>_slice-<k>_T1w.nii.gz`` (axial, the UK Biobank names) and
``images/<subject>_plane-<plane>_slice-<k>_T1w.nii.gz`` (coronal, sagittal), each (H, W) = ``target_shape``, float32
in [0, 1], with the slice's affine; ``datalist.json`` as in :func:`~common.data.brain.mri_preparation.prepare_brain_mri`
(written atomically, once every slice is written; a non-empty ``output_dir`` is refused unless ``overwrite``) whose
entries are ``{"image", "caption", "subject", "slice_index", "slice_z_mm", "facts"}`` with ``facts``::

    {"cohort": "ixi", "subject": "IXI002", "age": 35.8, "age_range": null, "sex": "female", "healthy": true,
     "site": "Guys", "space": "MNI152", "cdr": null, "mmse": null, "nwbv": null, "etiv_ml": null,
     "plane": "axial", "slice_index": 91, "slice_position_mm": 19.0}

``slice_position_mm`` is the template coordinate (mm) of the slice along its normal (z for axial, y for coronal, x for
sagittal) at the slice centre; ``slice_z_mm`` is, as in UK Biobank entries, the z coordinate of the slice centre (the
same number for axial slices); ``cdr``, ``mmse``, ``nwbv`` (normalised whole-brain volume) and ``etiv_ml``
(estimated total intracranial volume) are OASIS's and null elsewhere. Planes: the volume is transposed so that the
plane's normal is the last array axis (coronal: (x, z, y), sagittal: (y, z, x)) and the UK Biobank slice functions
run unchanged, so axial slices are exactly those of ``prepare_brain_mri`` and (H, W) is (x, y), (x, z) or (y, z).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.data.brain.mri_preparation import (
    DEFAULT_CAPTION,
    DEFAULT_TARGET_SHAPE,
    SPLITS,
    DataPreparationError,
    PreparationResult,
    VolumeHeader,
    _as_shape,
    _as_spacing,
    _check_arguments,
    _check_output_dir,
    _write_slice,
    crop_or_pad_offsets,
    crop_or_pad_xy,
    load_volume,
    minmax_normalise,
    publish_slices,
    read_header,
    resample_volume,
    select_slices,
    slice_affine,
    staging_folder,
)
from common.data.splits import split_subjects

__all__ = [
    "COHORTS",
    "PLANES",
    "TEMPLATES",
    "CohortPreparationResult",
    "CohortSpec",
    "CohortSubject",
    "Demographics",
    "TemplateGrid",
    "find_volumes",
    "grid_problems",
    "plane_slices",
    "prepare_brain_cohort",
    "read_demographics",
    "read_table",
]

logger = logging.getLogger(__name__)

#: Array axes (in-plane H, in-plane W, normal) of each plane in a LAS volume (x, y, z).
PLANES: dict[str, tuple[int, int, int]] = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
FOV_TOLERANCE = 0.03  # relative, per axis: 182 mm +- 5.5 mm; the T88 box (176 mm) is outside the MNI one
SPACING_TOLERANCE = 0.05  # relative
OBLIQUE_TOLERANCE = 0.01  # sine of the largest angle between an array axis and the nearest world axis (0.6 deg)
MAX_LISTED = 5  # files named in one error message
_MISSING = {"", "n/a", "na", "nan", "none"}


# --------------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class TemplateGrid:
    """A template's voxel grid: an array (X, Y, Z) of ``shape`` stored as ``axcodes``, cubic voxels of ``spacing_mm``."""

    name: str
    space: str  # recorded in every entry's facts
    shape: tuple[int, int, int]
    spacing_mm: float = 1.0
    axcodes: str = "LAS"

    @property
    def field_of_view_mm(self) -> np.ndarray:
        return np.asarray(self.shape, dtype=np.float64) * self.spacing_mm

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}


TEMPLATES: dict[str, TemplateGrid] = {
    "mni152": TemplateGrid("FSL MNI152 1 mm (MNI152_T1_1mm_brain)", "MNI152", (182, 218, 182)),
    "t88": TemplateGrid("OASIS T88_111 (Talairach-Tournoux 1988 atlas space)", "Talairach-T88", (176, 208, 176)),
}


def _zooms(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis of a 4x4 affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _fmt(values: Sequence[float], digits: int = 1) -> str:
    return " x ".join(f"{v:.{digits}f}".rstrip("0").rstrip(".") for v in values)


def grid_problems(header: VolumeHeader, grid: TemplateGrid, resampled: bool = False) -> list[str]:
    """How a volume's grid (``header`` as read with ``grid.axcodes``) differs from ``grid``; empty if it matches.

    Checks the orientation codes, oblique axes, the field of view (shape x voxel size, within ``FOV_TOLERANCE``) and,
    unless the volume will be ``resampled``, the voxel size (within ``SPACING_TOLERANCE``).
    """
    problems = []
    codes = "".join(nib.aff2axcodes(header.affine))
    if codes != grid.axcodes:
        problems.append(f"orientation {codes}, expected {grid.axcodes}")
    zooms = _zooms(header.affine)
    nearest_axis_cosine = np.abs(header.affine[:3, :3] / zooms).max(axis=0)
    if float(np.sqrt(np.clip(1.0 - nearest_axis_cosine**2, 0.0, None)).max()) > OBLIQUE_TOLERANCE:
        problems.append("oblique axes (rotated against the template grid)")
    fov = np.asarray(header.shape) * zooms
    if np.any(np.abs(fov - grid.field_of_view_mm) > FOV_TOLERANCE * grid.field_of_view_mm):
        problems.append(f"field of view {_fmt(fov)} mm, expected {_fmt(grid.field_of_view_mm)} mm")
    if not resampled and np.any(np.abs(zooms - grid.spacing_mm) > SPACING_TOLERANCE * grid.spacing_mm):
        problems.append(
            f"voxels of {_fmt(zooms, 2)} mm, expected {grid.spacing_mm:g} mm (resample with --spacing "
            f"{grid.spacing_mm:g})"
        )
    return problems


def _fix_hint(grid: TemplateGrid) -> str:
    if grid.space == "MNI152":
        return (
            "Skull-strip and register each volume to MNI152 first, e.g. `antsRegistrationSyNQuick.sh -d 3 -f "
            "MNI152_T1_1mm_brain.nii.gz -m IN_brain.nii.gz -o OUT_` and prepare OUT_Warped.nii.gz (through "
            "--t1_pattern); the steps are in the docstring of common/data/brain/cohorts.py."
        )
    return (
        f"Use the cohort's own {grid.name} images, or register them to MNI152 (see the docstring of "
        "common/data/brain/cohorts.py) and pass --template mni152."
    )


# --------------------------------------------------------------------------------------------------- demographics


@dataclass(frozen=True)
class Demographics:
    """What a cohort's demographics file says about one session; None where it says nothing or contradicts itself."""

    age: float | None = None  # years; for HCP the midpoint of age_range
    age_range: str | None = None  # HCP only, e.g. "26-30"
    sex: str | None = None  # "female" or "male"
    cdr: float | None = None  # OASIS: Clinical Dementia Rating (0, 0.5, 1, 2)
    mmse: float | None = None  # OASIS: Mini-Mental State Examination (0-30)
    nwbv: float | None = None  # OASIS: normalised whole-brain volume (fraction)
    etiv_ml: float | None = None  # OASIS: estimated total intracranial volume (ml)

    @property
    def healthy(self) -> bool:
        """No dementia rating above 0 (IXI and HCP rate none: their volunteers were recruited healthy)."""
        return self.cdr is None or self.cdr == 0


def _text(value: Any) -> str | None:
    """A cell as stripped text, None when blank; whole numbers from Excel lose their ``.0`` (``2.0`` -> ``"2"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip() if value is not None else ""
    return None if text.lower() in _MISSING else text


def _number(value: Any) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError as e:
        raise DataPreparationError(f"{text!r} is not a number") from e
    return number if math.isfinite(number) else None


def _letter_sex(value: Any) -> str | None:
    return {"F": "female", "M": "male"}.get((_text(value) or "").upper())


def _age_range_midpoint(age_range: str | None) -> float | None:
    """``"26-30"`` -> 28.0; an open range ``"36+"`` -> 36.0 (its lower end); None -> None."""
    if age_range is None:
        return None
    if match := re.fullmatch(r"(\d+)\s*-\s*(\d+)", age_range):
        return (int(match[1]) + int(match[2])) / 2
    if match := re.fullmatch(r"(\d+)\s*\+", age_range):
        return float(match[1])
    raise DataPreparationError(f"age {age_range!r} is not a range like '26-30' or '36+'")


def _ixi_row(row: dict[str, Any]) -> tuple[str, Demographics] | None:
    number = _number(row["id"])
    if number is None:
        return None
    sex_code = _number(row["sex"])
    age = _number(row["age"])
    return f"IXI{int(number):03d}", Demographics(
        age=age if age and age > 0 else None,  # 0 codes a missing value
        sex={1: "male", 2: "female"}.get(int(sex_code)) if sex_code is not None else None,
    )


def _oasis_row(row: dict[str, Any]) -> tuple[str, Demographics] | None:
    key = _text(row["id"])
    if key is None:
        return None
    return key.upper(), Demographics(
        age=_number(row["age"]),
        sex=_letter_sex(row["sex"]),
        cdr=_number(row["cdr"]),
        mmse=_number(row.get("mmse")),
        nwbv=_number(row.get("nwbv")),
        etiv_ml=_number(row.get("etiv")),
    )


def _hcp_row(row: dict[str, Any]) -> tuple[str, Demographics] | None:
    key = _text(row["id"])
    if key is None:
        return None
    age_range = _text(row["age"])
    return key, Demographics(age=_age_range_midpoint(age_range), age_range=age_range, sex=_letter_sex(row["sex"]))


def _ixi_volume(name: str) -> tuple[str, str, str | None]:
    match = re.match(r"IXI(\d+)(?:-(Guys|HH|IOP)-)?", name)
    if match is None:
        raise DataPreparationError(f"no IXI id (IXI<digits>) at the start of {name!r}")
    subject = f"IXI{int(match[1]):03d}"
    return subject, subject, match[2]


def _oasis_volume(name: str) -> tuple[str, str, str | None]:
    match = re.match(r"(OAS1_\d{4})_MR\d+", name, flags=re.IGNORECASE)
    if match is None:
        raise DataPreparationError(f"no OASIS-1 session id (OAS1_<4 digits>_MR<n>) at the start of {name!r}")
    return match[1].upper(), match[0].upper(), None


def _hcp_volume(name: str) -> tuple[str, str, str | None]:
    if not name.isdigit():
        raise DataPreparationError(f"{name!r} is not an HCP subject id (digits, e.g. 100307)")
    return name, name, None


@dataclass(frozen=True)
class CohortSpec:
    """How to read one cohort: where its volumes are, which template grid they lie on, its demographics columns.

    ``columns`` and ``optional_columns`` map a role (``id``, ``sex``, ``age``, ...) to the column header;
    ``row`` turns a row of roles into ``(record key, Demographics)`` (None for a row without id); ``volume`` turns the
    ``{subject}`` part of a volume's path into ``(subject id, record key, site)``.
    """

    name: str
    title: str
    default_pattern: str
    template: str
    columns: dict[str, str]
    row: Callable[[dict[str, Any]], tuple[str, Demographics] | None]
    volume: Callable[[str], tuple[str, str, str | None]]
    demographics_file: str  # what to give, for error messages
    optional_columns: dict[str, str] = field(default_factory=dict)


COHORTS: dict[str, CohortSpec] = {
    "ixi": CohortSpec(
        name="ixi",
        title="IXI",
        default_pattern="{subject}-T1.nii.gz",
        template="mni152",
        columns={"id": "IXI_ID", "sex": "SEX_ID (1=m, 2=f)", "age": "AGE"},
        row=_ixi_row,
        volume=_ixi_volume,
        demographics_file="IXI.xls (or a CSV export of its first sheet)",
    ),
    "oasis1": CohortSpec(
        name="oasis1",
        title="OASIS-1",
        default_pattern="{subject}/PROCESSED/MPRAGE/T88_111/{subject}_mpr_n*_anon_111_t88_masked_gfc.img",
        template="t88",
        columns={"id": "ID", "sex": "M/F", "age": "Age", "cdr": "CDR"},
        optional_columns={"mmse": "MMSE", "nwbv": "nWBV", "etiv": "eTIV"},
        row=_oasis_row,
        volume=_oasis_volume,
        demographics_file="oasis_cross-sectional.csv",
    ),
    "hcp": CohortSpec(
        name="hcp",
        title="HCP Young Adult",
        default_pattern="{subject}/MNINonLinear/T1w_restore_brain.nii.gz",
        template="mni152",
        columns={"id": "Subject", "sex": "Gender", "age": "Age"},
        row=_hcp_row,
        volume=_hcp_volume,
        demographics_file="the unrestricted behavioral data CSV (unrestricted_*.csv)",
    ),
}


def _cohort(name: str) -> CohortSpec:
    if name not in COHORTS:
        raise DataPreparationError(f"cohort must be one of {', '.join(COHORTS)}, got {name!r}")
    return COHORTS[name]


def read_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows (``{header: cell}``) of a spreadsheet: the first sheet of an Excel 97 ``.xls``, or a CSV.

    CSV: comma-separated, UTF-8 (a byte-order mark is skipped), header first; cells are text. ``.xls`` (read with
    xlrd): numbers are floats, empty cells ``""``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataPreparationError(f"demographics file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".xls":
        return _read_xls(path)
    if suffix != ".csv":
        raise DataPreparationError(f"demographics file {path} must be .xls or .csv (save other formats as CSV)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_xls(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import xlrd
    except ImportError as e:
        raise DataPreparationError(
            f"reading {path} needs xlrd (pip install 'xlrd>=2,<3'), or export its first sheet to CSV"
        ) from e
    try:
        with xlrd.open_workbook(str(path), logfile=io.StringIO()) as book:  # logfile: no chatter on stdout
            sheet = book.sheet_by_index(0)
            cells = [sheet.row_values(r) for r in range(sheet.nrows)]
    except Exception as e:  # xlrd raises several types for files it cannot read
        raise DataPreparationError(f"cannot read {path} as an Excel 97 .xls file ({e}); or export it to CSV") from e
    if not cells:
        return [], []
    header = [_text(v) or "" for v in cells[0]]
    return header, [dict(zip(header, row, strict=False)) for row in cells[1:]]


def _normalised(name: str) -> str:
    return " ".join(name.split()).lower()


def _resolve_columns(spec: CohortSpec, header: Sequence[str], path: Path) -> dict[str, str]:
    """Role -> header as spelled in the file (matched ignoring case and repeated spaces); raises on a missing one."""
    found = {_normalised(h): h for h in header if h}
    missing = [col for col in spec.columns.values() if _normalised(col) not in found]
    if missing:
        raise DataPreparationError(
            f"demographics file {path} has no column {', '.join(repr(c) for c in missing)} (columns found: "
            f"{', '.join(repr(h) for h in header if h) or 'none'}); {spec.title} needs "
            f"{', '.join(repr(c) for c in spec.columns.values())}: give {spec.demographics_file}"
        )
    wanted = {**spec.optional_columns, **spec.columns}
    return {role: found[_normalised(col)] for role, col in wanted.items() if _normalised(col) in found}


def _merge(key: str, first: Demographics, second: Demographics, warnings: list[str]) -> Demographics:
    """Field-wise union of two rows of one id; a field the rows disagree on becomes None (with a warning)."""
    merged = {}
    for f in fields(Demographics):
        a, b = getattr(first, f.name), getattr(second, f.name)
        same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, abs_tol=1e-3))
        if a is None or b is None or same:
            merged[f.name] = a if a is not None else b
        else:
            merged[f.name] = None
            warnings.append(f"{key}: the demographics rows disagree on {f.name} ({a} vs {b}); left unknown")
    return Demographics(**merged)


def read_demographics(cohort: str, path: str | os.PathLike) -> tuple[dict[str, Demographics], list[str]]:
    """``({record key: Demographics}, warnings)`` from a cohort's demographics file (see the module docstring).

    Record keys: ``IXI002`` (IXI), ``OAS1_0001_MR1`` (OASIS-1), ``100307`` (HCP). Rows without id are ignored; rows
    of one id are merged (:func:`_merge`). Raises ``DataPreparationError`` for a missing file or column, or a cell
    that cannot be read (naming the row).
    """
    spec, path = _cohort(cohort), Path(path)
    header, rows = read_table(path)
    columns = _resolve_columns(spec, header, path)
    records: dict[str, Demographics] = {}
    warnings: list[str] = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        try:
            parsed = spec.row({role: row.get(col) for role, col in columns.items()})
        except DataPreparationError as e:
            raise DataPreparationError(f"demographics file {path}, row {number}: {e}") from e
        if parsed is None:
            continue
        key, record = parsed
        records[key] = _merge(key, records[key], record, warnings) if key in records else record
    return records, warnings


# --------------------------------------------------------------------------------------------------- discovery


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """``{subject}`` -> a named group (a backreference when repeated), ``*`` / ``?`` -> within one path component."""
    pieces = []
    for n, literal in enumerate(pattern.split("{subject}")):
        if n:
            pieces.append("(?P<subject>[^/]+)" if n == 1 else "(?P=subject)")
        pieces.append("".join({"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)) for c in literal))
    return re.compile("".join(pieces))


def find_volumes(input_dir: str | os.PathLike, pattern: str) -> dict[str, Path]:
    """``{subject part: path}`` of the files under ``input_dir`` matching ``pattern`` (see Patterns above), by key.

    Raises ``DataPreparationError`` if the folder is missing, the pattern is absolute or lacks ``{subject}``, nothing
    matches, or one subject part matches two files.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise DataPreparationError(f"input directory not found: {root}")
    if "{subject}" not in pattern or Path(pattern).is_absolute():
        raise DataPreparationError(
            f"t1_pattern must be a path relative to the input directory with {{subject}} where the subject is named, "
            f"e.g. '{{subject}}_T1_mni_brain.nii.gz'; got {pattern!r}"
        )
    regex = _pattern_regex(pattern)
    found: dict[str, Path] = {}
    for path in sorted(p for p in root.glob(pattern.replace("{subject}", "*")) if p.is_file()):
        match = regex.fullmatch(path.relative_to(root).as_posix())
        if match is None:  # e.g. the two {subject} parts differ
            continue
        if (key := match["subject"]) in found:
            raise DataPreparationError(
                f"{key!r} matches two volumes, {found[key]} and {path}; make t1_pattern select one per subject"
            )
        found[key] = path
    if not found:
        raise DataPreparationError(
            f"no T1w volume matches the pattern {pattern!r} under {root}; point t1_pattern at the registered, "
            "brain-extracted volumes, {subject} marking the subject part (e.g. '{subject}_T1_mni_brain.nii.gz')"
        )
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class CohortSubject:
    """One healthy subject to prepare: its volume and what is known about it."""

    subject: str
    path: Path
    site: str | None
    demographics: Demographics


def _select(
    spec: CohortSpec, volumes: dict[str, Path], records: dict[str, Demographics], strict: bool
) -> tuple[list[CohortSubject], dict[str, int], list[str]]:
    """``(subjects, excluded counts, skip messages)``: one session per person, with demographics, healthy."""
    chosen: dict[str, CohortSubject] = {}
    first_session: dict[str, Path] = {}
    excluded = {"repeat_session": 0, "no_demographics": 0, "not_healthy": 0}
    reasons: list[tuple[str, str]] = []  # (reason, message) per volume left out
    for key, path in volumes.items():  # sorted: a person's first session (MR1) comes first
        try:
            subject, record_key, site = spec.volume(key)
        except DataPreparationError as e:
            raise DataPreparationError(f"{path}: {e}; fix t1_pattern so that {{subject}} matches the id") from e
        first_session.setdefault(subject, path)
        record = records.get(record_key)
        if first_session[subject] != path:
            reason, message = "repeat_session", f"{path}: {subject}'s first session ({first_session[subject]}) decides"
        elif record is None:
            reason, message = "no_demographics", f"{path}: {record_key} has no row in the demographics file"
        elif not record.healthy:
            reason, message = "not_healthy", f"{path}: {record_key} is not healthy (CDR {record.cdr:g})"
        else:
            chosen[subject] = CohortSubject(subject, path, site, record)
            continue
        excluded[reason] += 1
        reasons.append((reason, message))
    if strict and excluded["no_demographics"]:
        missing = [m for reason, m in reasons if reason == "no_demographics"]
        raise DataPreparationError(
            f"{len(missing)} volume(s) have no row in the demographics file ({'; '.join(missing[:MAX_LISTED])}); "
            "give the cohort's full demographics file, or leave out --strict to skip them"
        )
    if not chosen:
        raise DataPreparationError(
            f"no subject left to prepare of the {len(volumes)} volume(s) found: "
            + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in excluded.items() if n)
            + f"; check that the demographics file is {spec.demographics_file}"
        )
    return list(chosen.values()), excluded, [f"{m}, skipped" for _, m in reasons]


# --------------------------------------------------------------------------------------------------- checks


def _as_planes(planes: str | Sequence[str]) -> tuple[str, ...]:
    """``"axial,coronal"`` or ``["axial", "coronal"]`` -> ``("axial", "coronal")``; raises on an unknown plane."""
    names = [p.strip() for p in (planes.split(",") if isinstance(planes, str) else planes)]
    if not names or any(p not in PLANES for p in names) or len(set(names)) != len(names):
        raise DataPreparationError(f"planes must be distinct names among {', '.join(PLANES)}, got {planes!r}")
    return tuple(names)


def _template(spec: CohortSpec, template: str | None, grid_shape: Sequence[int] | str | None) -> TemplateGrid:
    name = template or spec.template
    if name not in TEMPLATES:
        raise DataPreparationError(f"template must be one of {', '.join(TEMPLATES)}, got {name!r}")
    if grid_shape is None:
        return TEMPLATES[name]
    items = grid_shape.replace("x", ",").split(",") if isinstance(grid_shape, str) else grid_shape
    try:
        shape = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise DataPreparationError(f"grid_shape must be three positive integers (X, Y, Z), got {grid_shape!r}")
    return replace(TEMPLATES[name], shape=shape)


def _check_grids(
    subjects: Sequence[CohortSubject],
    grid: TemplateGrid,
    spacing: Sequence[float] | None,
    planes: Sequence[str],
    span: int,
) -> None:
    """Every volume on the template grid and deep enough along each plane's normal, or one error naming them all."""
    problems = []
    for s in subjects:
        header = read_header(s.path, grid.axcodes)
        if issues := grid_problems(header, grid, resampled=spacing is not None):
            problems.append(f"{s.path}: {'; '.join(issues)}")
            continue
        sizes = header.shape if spacing is None else np.rint(np.asarray(header.shape) * _zooms(header.affine) / spacing)
        for plane in planes:
            if (depth := int(sizes[PLANES[plane][2]])) < span:
                raise DataPreparationError(
                    f"{s.path} has {depth} {plane} slices, fewer than the {span} that num_slices and slice_step need"
                )
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataPreparationError(
            f"{len(problems)} volume(s) are not on the {grid.name} grid ({_fmt(grid.shape)} voxels of "
            f"{grid.spacing_mm:g} mm, {grid.axcodes}); nothing was written:\n  "
            + "\n  ".join(problems[:MAX_LISTED])
            + more
            + f"\n{_fix_hint(grid)}"
        )


# --------------------------------------------------------------------------------------------------- slices


def _permuted_affine(affine: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Affine of ``np.transpose(volume, order)``: its voxel (i0, i1, i2) is the volume's voxel with index
    ``i_k`` on axis ``order[k]``."""
    permutation = np.zeros((4, 4))
    permutation[list(order), [0, 1, 2]] = 1.0
    permutation[3, 3] = 1.0
    return np.asarray(affine, dtype=np.float64) @ permutation


def plane_slices(
    volume: np.ndarray,
    affine: np.ndarray,
    plane: str,
    num_slices: int,
    slice_step: int,
    slice_center: str,
    target_shape: Sequence[int],
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(index along the normal, slice (H, W), 4x4 slice affine)`` of the chosen slices of one plane of ``volume``.

    ``volume`` (X, Y, Z) is LAS; it is transposed so that the plane's normal is the last axis, then the UK Biobank
    selection, crop/pad and slice affine apply as they are (axial: identity, so exactly ``prepare_brain_mri``'s).
    """
    order = PLANES[plane]
    permuted = np.transpose(volume, order)
    permuted_affine = _permuted_affine(affine, order)
    indices = select_slices(permuted, num_slices, slice_step, slice_center)
    offsets = crop_or_pad_offsets(permuted.shape[:2], target_shape)
    slices = crop_or_pad_xy(permuted[:, :, indices], target_shape)  # (H, W, num_slices)
    return [(k, slices[..., n], slice_affine(permuted_affine, offsets, k)) for n, k in enumerate(indices)]


@dataclass(frozen=True)
class _Slicing:
    """The per-volume processing settings, checked."""

    planes: tuple[str, ...]
    num_slices: int
    slice_step: int
    slice_center: str
    target_shape: tuple[int, ...]
    spacing: tuple[float, float, float] | None
    caption: str


def _facts(cohort: str, s: CohortSubject, grid: TemplateGrid) -> dict[str, Any]:
    d = s.demographics
    return {
        "cohort": cohort,
        "subject": s.subject,
        "age": None if d.age is None else round(d.age, 2),
        "age_range": d.age_range,
        "sex": d.sex,
        "healthy": d.healthy,
        "site": s.site,
        "space": grid.space,
        "cdr": d.cdr,
        "mmse": d.mmse,
        "nwbv": d.nwbv,
        "etiv_ml": d.etiv_ml,
    }


def _slice_name(subject: str, plane: str, k: int) -> str:
    """Axial slices keep the UK Biobank names; other planes say which they are."""
    return f"{subject}_slice-{k}_T1w.nii.gz" if plane == "axial" else f"{subject}_plane-{plane}_slice-{k}_T1w.nii.gz"


def _subject_entries(
    s: CohortSubject, cohort: str, grid: TemplateGrid, staging: Path, slicing: _Slicing
) -> list[dict[str, Any]]:
    """Write the slices of one subject into ``staging`` and return its datalist entries."""
    volume, affine, header = load_volume(s.path, grid.axcodes)
    if slicing.spacing is not None:
        volume, affine = resample_volume(volume, affine, slicing.spacing)
    volume = minmax_normalise(volume)
    height, width = slicing.target_shape
    centre = np.array([(height - 1) / 2, (width - 1) / 2, 0.0, 1.0])
    subject_facts = _facts(cohort, s, grid)
    entries = []
    for plane in slicing.planes:
        chosen = plane_slices(
            volume, affine, plane, slicing.num_slices, slicing.slice_step, slicing.slice_center, slicing.target_shape
        )
        for k, data, aff in chosen:
            name = _slice_name(s.subject, plane, k)
            _write_slice(staging / name, data, aff, header)
            world = aff @ centre
            facts = {
                **subject_facts,
                "plane": plane,
                "slice_index": k,
                "slice_position_mm": round(float(world[PLANES[plane][2]]), 4),
            }
            entries.append(
                {
                    "image": f"images/{name}",
                    "caption": slicing.caption,
                    "subject": s.subject,
                    "slice_index": k,
                    "slice_z_mm": round(float(world[2]), 4),
                    "facts": facts,
                }
            )
    return entries


# --------------------------------------------------------------------------------------------------- pipeline


@dataclass
class CohortPreparationResult(PreparationResult):
    """:class:`PreparationResult` plus how many volumes were left out, by reason."""

    excluded: dict[str, int] = field(default_factory=dict)  # repeat_session / no_demographics / not_healthy -> count


def prepare_brain_cohort(
    cohort: str,
    input_dir: str | os.PathLike,
    demographics: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    t1_pattern: str | None = None,
    template: str | None = None,
    grid_shape: Sequence[int] | str | None = None,
    planes: str | Sequence[str] = "axial",
    num_slices: int = 5,
    slice_step: int = 1,
    slice_center: str = "volume",
    target_shape: Sequence[int] = DEFAULT_TARGET_SHAPE,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    caption: str = DEFAULT_CAPTION,
    spacing: float | Sequence[float] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> CohortPreparationResult:
    """Turn the healthy subjects of ``cohort`` (``ixi``, ``oasis1``, ``hcp``) into 2D slices with facts and a datalist.

    See the module docstring for the cohorts, the grid check, the outputs and the facts. ``t1_pattern`` (default: the
    cohort's layout) finds the volumes; ``template`` (``mni152`` or ``t88``; default: the cohort's) is the grid they
    must lie on, ``grid_shape`` replaces its voxel counts (X, Y, Z) (for a template cropped otherwise); ``planes``
    (``"axial"``, or any of ``"axial,coronal,sagittal"``) chooses the slice orientations, ``num_slices`` each. The
    other arguments are those of :func:`~common.data.brain.mri_preparation.prepare_brain_mri`; volumes are always
    reoriented to the template's LAS. Every check runs before anything is written: arguments, demographics columns,
    volumes found, subjects selected, output folder, each volume's grid and depth. A failure while writing removes
    everything this run wrote.
    """
    spec = _cohort(cohort)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    target_shape = _as_shape(target_shape)
    _check_arguments(num_slices, slice_step, slice_center, target_shape, caption)
    spacing = _as_spacing(spacing)
    planes = _as_planes(planes)
    grid = _template(spec, template, grid_shape)
    try:
        split_subjects([], val_fraction, test_fraction, seed)  # validates the fractions before any work
    except ValueError as err:
        raise DataPreparationError(str(err)) from err
    pattern = t1_pattern or spec.default_pattern
    records, warnings = read_demographics(spec.name, demographics)
    volumes = find_volumes(input_dir, pattern)
    subjects, excluded, skipped = _select(spec, volumes, records, strict)
    for message in warnings + skipped:
        logger.warning(message)
    _check_output_dir(output_dir, input_dir, overwrite)
    _check_grids(subjects, grid, spacing, planes, (num_slices - 1) * slice_step + 1)
    splits = split_subjects([s.subject for s in subjects], val_fraction, test_fraction, seed)

    slicing = _Slicing(planes, num_slices, slice_step, slice_center, target_shape, spacing, caption)
    with staging_folder(output_dir) as staging:
        entries = {
            s.subject: _subject_entries(s, spec.name, grid, staging, slicing)
            for s in tqdm(subjects, desc=f"Preparing {spec.title}", unit="subject", disable=not progress)
        }

    datalist: dict[str, Any] = {
        "description": (
            f"{len(subjects)} healthy {spec.title} subjects from {input_dir} on the {grid.name} grid: {num_slices} "
            f"{'/'.join(planes)} slices {slice_step} apart around the "
            f"{'middle of the volume' if slice_center == 'volume' else 'centre of mass'}, centre-cropped/padded to "
            f"{target_shape[0]}x{target_shape[1]}, min-max scaled to [0, 1] per volume; split by subject (seed {seed}, "
            f"validation {val_fraction}, test {test_fraction}). Entry 'facts' describe the subject and the slice."
        ),
        "preparation": {
            "tool": "tools/prepare_brain_cohorts.py",
            "cohort": spec.name,
            "input_dir": str(input_dir.resolve()),
            "demographics": str(Path(demographics).resolve()),
            "t1_pattern": pattern,
            "template": grid.to_dict(),
            "planes": list(planes),
            "num_slices": num_slices,
            "slice_step": slice_step,
            "slice_center": slice_center,
            "target_shape": list(target_shape),
            "spacing_mm": None if spacing is None else list(spacing),
            "intensity": "min-max per volume to [0, 1]",
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "num_subjects": {split: len(ids) for split, ids in splits.items()},
            "excluded": excluded,
            "skipped": skipped,
            "demographics_warnings": warnings,
        },
    }
    for split in SPLITS:
        datalist[split] = [entry for subject in splits[split] for entry in entries[subject]]
    return CohortPreparationResult(
        output_dir=output_dir,
        datalist_path=publish_slices(output_dir, staging, datalist),
        splits=splits,
        num_slices_written=sum(len(e) for e in entries.values()),
        skipped=skipped,
        excluded=excluded,
    )
