"""Condition images for image-to-image bundles: reading a user's slice or volume, and writing the translation.

A condition image is a single-channel 2D slice (NIfTI or PNG) or a 3D NIfTI volume whose axial slices
(last axis) are translated one by one. NIfTI outputs keep the input's affine and header, so a translated
volume overlays its input in any viewer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import PILWriter
from monai.transforms import LoadImage, ScaleIntensityRangePercentiles

from common.io import atomic_path, write_json

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
    extra: dict[str, Any] = field(default_factory=dict)

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


def load_condition_image(path: str | Path, image_size: Sequence[int], modality: str = "FLAIR") -> ConditionImage:
    """Read and check a condition image; every problem raises ``ValueError`` before any work starts.

    Args:
        path: a ``.nii``/``.nii.gz`` 2D slice or 3D volume, or a grayscale ``.png`` slice.
        image_size: ``(H, W)`` the network was trained on; slices must have it.
        modality: named in error messages.
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
            f"image to the model's grid first (tools/prepare_brain_mri.py does this for raw scans)."
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


def translation_requests(condition: ConditionImage, seed: int, prompt: str = "") -> list[dict[str, Any]]:
    """One request per slice: ``{"condition", "seed", "slice", "prompt"}``.

    Every slice of a volume starts from the noise of the same ``seed``, so the output depends only on the
    input and the seed (not on batching), and neighbouring slices are drawn alike.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    return [
        {"condition": condition.slices[k], "seed": seed, "slice": k, "prompt": prompt}
        for k in range(condition.slices.shape[0])
    ]


class TranslatedImageWriter:
    """Collect the translated slices of one condition image and write them when the engine completes.

    Files, named ``<input stem>_<suffix>_seed<seed>`` and written to a temporary name then renamed:

    * ``.nii.gz``: the translation with the input's shape, affine and header (NIfTI input), or with
      ``spacing`` (PNG input);
    * ``.png``: for a single slice, 8-bit;
    * ``.json``: sidecar with the input, seed, ``sidecar`` fields (bundle, version, knobs) and the files.

    Args:
        condition: the input, from :func:`load_condition_image`.
        output_dir: destination folder (created).
        seed: the seed of the requests (names the files).
        spacing: pixel spacing in mm for outputs of a PNG input.
        suffix: what the output is, e.g. ``"T1w"``.
        sidecar: constant fields for the sidecar.
        pred_key: key of the translation in the decollated engine output.
        slice_key: key of the slice index in the decollated batch.
    """

    def __init__(
        self,
        condition: ConditionImage,
        output_dir: str,
        seed: int,
        spacing: Sequence[float],
        suffix: str = "T1w",
        sidecar: dict[str, Any] | None = None,
        pred_key: str = "pred",
        slice_key: str = "slice",
    ) -> None:
        self.condition = condition
        self.output_dir = Path(output_dir)
        self.seed = int(seed)
        self.spacing = tuple(float(s) for s in spacing)
        self.suffix = suffix
        self.sidecar = dict(sidecar or {})
        self.pred_key = pred_key
        self.slice_key = slice_key
        self._slices: dict[int, np.ndarray] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self._slices.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        # With decollation the batch and the output are lists of per-slice dicts in the same order.
        for request, item in zip(engine.state.batch, engine.state.output, strict=True):
            pred = item[self.pred_key]
            pred = pred.detach().float().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            self._slices[int(request[self.slice_key])] = np.clip(pred[0], 0.0, 1.0)

    @property
    def stem(self) -> str:
        return f"{self.condition.stem}_{self.suffix}_seed{self.seed}"

    def write(self, _: Engine | None = None) -> list[Path]:
        expected = self.condition.slices.shape[0]
        if sorted(self._slices) != list(range(expected)):
            raise RuntimeError(f"Got translated slices {sorted(self._slices)} of {expected}; nothing written.")
        volume = np.stack([self._slices[k] for k in range(expected)], axis=-1).astype(np.float32)  # (H, W, S)
        written = [self._write_nifti(volume.reshape(self.condition.shape))]
        if expected == 1:
            written.append(self._write_png(volume[..., 0]))
        record = {
            **self.sidecar,
            "input_image": str(self.condition.path),
            "input_kind": self.condition.kind,
            "input_rescaled": self.condition.rescaled,
            "seed": self.seed,
            "num_slices": expected,
            "files": [p.name for p in written],
        }
        write_json(self.output_dir / f"{self.stem}.json", record)
        logger.info("Wrote %s", ", ".join(str(p) for p in written))
        return written

    def _write_nifti(self, array: np.ndarray) -> Path:
        if self.condition.affine is not None:
            header = self.condition.header.copy()
            header.set_data_dtype(np.float32)
            header["scl_slope"], header["scl_inter"] = 1.0, 0.0  # values are written as they are
            image = nib.Nifti1Image(array, self.condition.affine, header=header)
        else:
            image = nib.Nifti1Image(array, np.diag([*self.spacing, 1.0, 1.0]))
        path = self.output_dir / f"{self.stem}.nii.gz"
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
        return path

    def _write_png(self, array: np.ndarray) -> Path:
        path = self.output_dir / f"{self.stem}.png"
        writer = PILWriter(output_dtype=np.uint8, scale=255)
        writer.set_data_array(array[None], channel_dim=0, squeeze_end_dims=True)
        writer.set_metadata({"spatial_shape": array.shape})
        with atomic_path(path) as tmp:
            writer.write(str(tmp), verbose=False)
        return path
