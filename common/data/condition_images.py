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


def load_condition_image(
    path: str | Path, image_size: Sequence[int], modality: str, resample_hint: str = ""
) -> ConditionImage:
    """Read and check a condition image; every problem raises ``ValueError`` before any work starts.

    Args:
        path: a ``.nii``/``.nii.gz`` 2D slice or 3D volume, or a grayscale ``.png`` slice.
        image_size: ``(H, W)`` the network was trained on; slices must have it.
        modality: what the image must be (e.g. ``"FLAIR"``), named in error messages.
        resample_hint: how to bring an image of another size to the model's grid (the bundle's tool).
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
    stack, rescaled = to_unit_range(stack)
    if rescaled:
        logger.info("%s was outside [0, 1]: rescaled robustly (minimum -> 0, 99.5th percentile -> 1).", path)
    slices = torch.from_numpy(np.ascontiguousarray(stack))[:, None]
    return ConditionImage(path, slices, kind, shape, affine, header, rescaled)
