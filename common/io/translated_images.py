"""Writing the translation of a condition image: NIfTI with the input's affine and header, PNG, JSON sidecar."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import PILWriter

from common.data.condition_images import ConditionImage
from common.io.atomic import atomic_path, check_output_dir, write_json
from common.io.output_names import check_new_files, settings_digest
from common.io.weights import sha256sum

logger = logging.getLogger(__name__)


class TranslatedImageWriter:
    """Collect the translated slices of one condition image and write them when the engine completes.

    Files, named ``<input stem>_<suffix>_seed<seed>_<digest>`` (:mod:`common.io.output_names`: the digest covers
    the input's content, the ``sidecar`` settings and the weights, so two inputs of the same name or two settings
    never share a name) and written to a temporary name then renamed:

    * ``.nii.gz``: the translation with the input's shape, affine and header (NIfTI input), or with
      ``spacing`` (PNG input);
    * ``.png``: for a single slice, 8-bit;
    * ``.json``: sidecar with the input, seed, ``sidecar`` fields (bundle, version, knobs) and the files.

    Args:
        condition: the input, from :func:`load_condition_image`.
        output_dir: destination folder (created).
        seed: the seed of the requests (names the files).
        spacing: pixel spacing in mm for outputs of a PNG input.
        suffix: what the output is, e.g. ``"T1w"`` (names the files).
        sidecar: constant fields for the sidecar.
        provenance: what made the output (``common.io.provenance.output_provenance``: bundle, version, weight
            hashes, demo or not), first in the sidecar.
        pred_key: key of the translation in the decollated engine output.
        slice_key: key of the slice index in the decollated batch.
        overwrite: replace files that exist already; otherwise existing names are refused here, before any work.
    """

    def __init__(
        self,
        condition: ConditionImage,
        output_dir: str,
        seed: int,
        spacing: Sequence[float],
        suffix: str,
        sidecar: dict[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
        pred_key: str = "pred",
        slice_key: str = "slice",
        overwrite: bool = False,
    ) -> None:
        self.condition = condition
        self.output_dir = check_output_dir(output_dir)  # before any sampling, not after
        self.seed = int(seed)
        self.spacing = tuple(float(s) for s in spacing)
        self.suffix = suffix
        self.sidecar = dict(sidecar or {})
        self.provenance = dict(provenance or {})
        self.pred_key = pred_key
        self.slice_key = slice_key
        self._slices: dict[int, np.ndarray] = {}
        self.overwrite = bool(overwrite)
        self._stem = self._make_stem()
        check_new_files(self.paths(), self.overwrite)

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
        return self._stem

    def _make_stem(self) -> str:
        settings = {
            "input_sha256": sha256sum(self.condition.path),
            **self.sidecar,
            "weights": {k: v.get("sha256") for k, v in self.provenance.get("weights", {}).items()},
        }
        return f"{self.condition.stem}_{self.suffix}_seed{self.seed}_{settings_digest(settings)}"

    def paths(self) -> list[Path]:
        """The files this writer will write: NIfTI, PNG for a single slice, and the sidecar."""
        exts = ["nii.gz", "png", "json"] if self.condition.slices.shape[0] == 1 else ["nii.gz", "json"]
        return [self.output_dir / f"{self.stem}.{ext}" for ext in exts]

    def write(self, _: Engine | None = None) -> list[Path]:
        expected = self.condition.slices.shape[0]
        if sorted(self._slices) != list(range(expected)):
            raise RuntimeError(f"Got translated slices {sorted(self._slices)} of {expected}; nothing written.")
        volume = np.stack([self._slices[k] for k in range(expected)], axis=-1).astype(np.float32)  # (H, W, S)
        if not np.isfinite(volume).all():
            raise ValueError(
                "The translation holds non-finite values (NaN or inf); nothing was written. Check the sampling "
                "settings (conditioning_scale, guidance_scale, eta) and that the weights are not corrupted."
            )
        check_new_files(self.paths(), self.overwrite)  # a concurrent run may have written them meanwhile
        written = [self._write_nifti(volume.reshape(self.condition.shape))]
        if expected == 1:
            written.append(self._write_png(volume[..., 0]))
        record = {
            **self.provenance,
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
