"""Condition images for image-to-image bundles: reading a user's slice or volume, checked before any work."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage, ScaleIntensityRangePercentiles

logger = logging.getLogger(__name__)


NIFTI_SUFFIXES = (".nii.gz", ".nii")


PNG_SUFFIXES = (".png",)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (*NIFTI_SUFFIXES, *PNG_SUFFIXES) if name.endswith(s)), "")


@dataclass
class ConditionImage:
    """A condition image read from ``path``, as slices ``(S, 1, H, W)`` in [0, 1].

    ``kind`` is ``"slice"`` (one 2D image) or ``"volume"`` (a 3D NIfTI, slices along its last axis).
    ``affine`` and ``header`` are those of a NIfTI input (``None`` for a PNG); ``shape`` is the input's
    array shape, which the output keeps.
    """

    path: Path
    slices: torch.Tensor
    kind: str
    shape: tuple[int, ...]
    affine: np.ndarray | None = None
    header: Any = None
    rescaled: bool = False

    @property
    def stem(self) -> str:
        name = self.path.name
        return name[: -len(_suffix(self.path))] if _suffix(self.path) else self.path.stem


def to_unit_range(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """``array`` unchanged if it already lies in [0, 1] (as training data do), else a robust min-max to [0, 1].

    The robust rescale maps the minimum to 0 and the 99.5th percentile to 1 (clipped), as the data
    preparation tools do. Returns the array and whether it was rescaled.
    """
    if array.min() >= 0.0 and array.max() <= 1.0:
        return array.astype(np.float32), False
    scaled = ScaleIntensityRangePercentiles(lower=0, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(array)
    return np.asarray(scaled, dtype=np.float32), True


#: Relative difference of voxel spacing accepted without resampling.
SPACING_TOLERANCE = 0.05
#: Below this fraction of zero voxels an image is not skull-stripped like the training data (phantoms: about 45 %).
MIN_BACKGROUND_FRACTION = 0.05


def check_grid(
    path: Path, affine: np.ndarray, spacing: Sequence[float], modality: str, resample_hint: str = ""
) -> None:
    """Refuse a NIfTI whose in-plane spacing or axis order differs from the model's, with the numbers.

    A left-right flip (radiological storage) is accepted with a warning: the brain is nearly symmetric and the
    output is written back in the input's own geometry.
    """
    zooms = np.sqrt((np.asarray(affine)[:3, :2] ** 2).sum(axis=0))
    expected = np.asarray([float(s) for s in spacing][:2])
    if np.any(np.abs(zooms - expected) > SPACING_TOLERANCE * expected):
        raise ValueError(
            f"{path} has in-plane voxels of {zooms[0]:.2f} x {zooms[1]:.2f} mm, but the model was trained on "
            f"{expected[0]:.2f} x {expected[1]:.2f} mm {modality} slices: the anatomy would be at the wrong scale and "
            f"the translation garbage. Resample the image to {expected[0]:g} mm first (prepare-brain-mri --spacing "
            f"{expected[0]:g}). {resample_hint}".rstrip()
        )
    codes = nib.aff2axcodes(affine)
    if codes[0] not in "LR" or codes[1] != "A" or codes[2] not in "SI":
        raise ValueError(
            f"{path} is stored with array axes {''.join(codes)}; the model was trained on axial {modality} slices "
            "stored left-right, posterior-anterior (RAS or LAS): a turned or front-to-back flipped brain translates "
            "into garbage. Reorient it first (prepare-brain-mri does, or nibabel's as_closest_canonical)."
        )
    if codes[0] == "L":
        logger.warning("%s is stored left-right flipped (axes %s); translated as it is.", path, "".join(codes))


def warn_if_not_skull_stripped(path: Path, stack: np.ndarray, modality: str) -> None:
    """Warn when almost no voxel is zero: the model was trained on skull-stripped slices with a zero background.

    A cheap check that catches photographs, screenshots and unprocessed scans, which the model would turn into
    plausible-looking nonsense.
    """
    fraction = float((stack == stack.min()).mean())
    if fraction < MIN_BACKGROUND_FRACTION:
        logger.warning(
            "%s has almost no background (%.1f %% of voxels at its minimum, training slices about 45 %%): it does not "
            "look like a skull-stripped %s slice; the translation may be meaningless.",
            path,
            100 * fraction,
            modality,
        )


def load_condition_image(
    path: str | Path,
    image_size: Sequence[int],
    modality: str,
    resample_hint: str = "",
    spacing: Sequence[float] | None = None,
) -> ConditionImage:
    """Read and check a condition image; every problem raises ``ValueError`` before any work starts.

    Args:
        path: a ``.nii``/``.nii.gz`` 2D slice or 3D volume, or a grayscale ``.png`` slice.
        image_size: ``(H, W)`` the network was trained on; slices must have it.
        modality: what the image must be (e.g. ``"FLAIR"``), named in error messages.
        resample_hint: how to bring an image of another size to the model's grid (the bundle's tool).
        spacing: in-plane voxel spacing ``(sx, sy)`` in mm the network was trained on. A NIfTI input must have it
            (within 5 %) and the training orientation (array axes left-right, posterior-anterior, axial slices),
            since a model shown anatomy at another scale or turned translates it into garbage. A PNG carries no
            spacing: it is taken as given.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Input {modality} image not found: {path}. Pass an existing file with --input_image.")
    suffix = _suffix(path)
    if not suffix:
        raise ValueError(f"Unsupported file type '{path.name}': give a NIfTI (.nii, .nii.gz) or PNG (.png) image.")
    size = tuple(int(s) for s in image_size)
    affine = header = None
    try:
        if suffix in NIFTI_SUFFIXES:
            image = nib.load(str(path))
            array = np.asarray(image.dataobj, dtype=np.float32)
            affine, header = image.affine, image.header
        else:
            array = np.asarray(LoadImage(image_only=True, reader="PILReader")(str(path)), dtype=np.float32)
    except Exception as err:  # any reader failure means the same thing to the user
        raise ValueError(f"Cannot read {path} as a {modality} image ({type(err).__name__}: {err}).") from err
    shape = tuple(array.shape)
    if suffix in PNG_SUFFIXES and array.ndim == 3:
        # PILReader puts colour channels last; a grayscale image saved as RGB(A) has equal colour channels.
        colour = array[..., :3]
        if not np.allclose(colour, colour[..., :1]):
            raise ValueError(
                f"{path} is a colour image with {array.shape[-1]} different channels; this model takes one "
                f"{modality} channel. Save the slice as a grayscale PNG."
            )
        array, shape = array[..., 0], array.shape[:2]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        kind, stack = "slice", array[None]
    elif array.ndim == 3:
        kind = "slice" if array.shape[-1] == 1 else "volume"
        stack = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(
            f"{path} has shape {shape}: expected one {modality} slice (H, W) or volume (H, W, slices). A 4D image "
            f"holds several channels or modalities; this model takes exactly one ({modality}). Extract it first."
        )
    if stack.shape[1:] != size:
        raise ValueError(
            f"{path} has {modality} slices of size {stack.shape[1:]}, but the model expects {size}. Resample the "
            f"image to the model's grid first. {resample_hint}".rstrip()
        )
    if not np.isfinite(stack).all():
        raise ValueError(f"{path} contains NaN or infinite values; fix or mask them before translating.")
    if stack.max() == stack.min():
        raise ValueError(f"{path} is constant (every voxel is {stack.min()}); it holds no {modality} image.")
    if affine is not None and spacing is not None:
        check_grid(path, affine, spacing, modality, resample_hint)
    warn_if_not_skull_stripped(path, stack, modality)
    stack, rescaled = to_unit_range(stack)
    if rescaled:
        logger.info("%s was outside [0, 1]: rescaled robustly (minimum -> 0, 99.5th percentile -> 1).", path)
    slices = torch.from_numpy(np.ascontiguousarray(stack))[:, None]
    return ConditionImage(path, slices, kind, shape, affine, header, rescaled)
