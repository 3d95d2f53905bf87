"""Writing generated images: NIfTI with spacing, PNG, and a JSON sidecar with how each was made."""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import NibabelWriter, PILWriter
from monai.transforms import MapTransform

from common.io.atomic import atomic_path, check_output_dir, write_json
from common.io.output_names import check_new_files, settings_digest

#: Output formats and the file-name ending of each: NIfTI (float32, with spacing), 8-bit PNG, 16-bit PNG.
FORMAT_SUFFIXES: dict[str, str] = {"nii.gz": ".nii.gz", "png": ".png", "png16": "_16bit.png"}
#: PNG formats: output dtype and the value that 1.0 maps to.
PNG_DEPTHS: dict[str, tuple[type, int]] = {"png": (np.uint8, 255), "png16": (np.uint16, 65535)}


def slugify(text: str, max_len: int = 80) -> str:
    """A file-name-safe short form of a prompt: ``"T1-weighted image."`` -> ``"t1-weighted_image"``."""
    slug = re.sub(r"[^a-z0-9-]+", "_", text.lower()).strip("_")
    if len(slug) > max_len:  # cut at a word boundary where there is one
        cut = slug[: max_len + 1]
        slug = cut[: cut.rfind("_")] if "_" in cut else slug[:max_len]
    return slug.rstrip("_") or "unconditional"


class GeneratedImageWriterd(MapTransform):
    """Write ``data[image_key]`` ``(1, H, W)`` in [0, 1] as ``<stem>.nii.gz``, ``<stem>.png`` and ``<stem>.json``.

    ``stem`` is ``<prompt slug>_seed<seed>_<digest>`` (:mod:`common.io.output_names`: the digest covers the full
    prompt, the ``sidecar`` settings, the image size and the weights), so the same request always lands on the
    same names, other settings on other names, and nothing is timestamped. Given the ``requests`` to be run,
    the writer refuses at construction, before any sampling, names that exist already (unless ``overwrite``).
    Every file is written to a temporary name and renamed. The NIfTI gets an affine with ``spacing`` (mm); the
    PNG is 8-bit. The sidecar records ``sidecar`` (bundle name, version, sampling knobs) plus the request keys
    (``prompt``, ``seed``, ``index``); it is strict JSON (a non-finite number is an error, not ``NaN``).

    Args:
        output_dir: destination folder (created).
        spacing: in-plane pixel spacing in mm, ``(sx, sy)``.
        sidecar: constant fields for every sidecar.
        provenance: what made the output (``common.io.provenance.output_provenance``: bundle, version, weight
            hashes, demo or not), first in the sidecar.
        request_keys: keys of the sample request copied into the sidecar and used for the name.
        name_key: request key whose text names the file.
        requests: the sample requests that will be written (their names are checked before any work).
        overwrite: replace files that exist already.
    """

    def __init__(
        self,
        output_dir: str,
        spacing: Sequence[float],
        sidecar: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
        image_key: str = "pred",
        request_keys: Sequence[str] = ("prompt", "seed", "index"),
        name_key: str = "prompt",
        formats: Sequence[str] = ("nii.gz", "png"),
        requests: Sequence[Mapping[Hashable, Any]] = (),
        overwrite: bool = False,
    ) -> None:
        super().__init__(keys=[image_key])
        self.output_dir = check_output_dir(output_dir)  # before any sampling, not after
        self.spacing = tuple(float(s) for s in spacing)
        self.sidecar = dict(sidecar or {})
        self.provenance = dict(provenance or {})
        self.image_key = image_key
        self.request_keys = tuple(request_keys)
        self.name_key = name_key
        unknown = set(formats) - set(FORMAT_SUFFIXES)
        if unknown or not formats:
            raise ValueError(
                f"Unknown output formats {sorted(unknown)}: use one or more of {', '.join(FORMAT_SUFFIXES)}."
            )
        self.formats = tuple(formats)
        self.overwrite = bool(overwrite)
        check_new_files((p for request in requests for p in self.paths(request)), self.overwrite)

    def stem(self, data: Mapping[Hashable, Any]) -> str:
        settings = {
            self.name_key: str(data[self.name_key]),
            **self.sidecar,
            "weights": {k: v.get("sha256") for k, v in self.provenance.get("weights", {}).items()},
        }
        if "image_size" in data:
            settings["image_size"] = _plain(data["image_size"])
        slug = slugify(str(data[self.name_key]), max_len=48)
        return f"{slug}_seed{int(data['seed'])}_{settings_digest(settings)}"

    def paths(self, data: Mapping[Hashable, Any]) -> list[Path]:
        """The files written for one request: one per format, and the sidecar."""
        stem = self.stem(data)
        return [self.output_dir / f"{stem}{FORMAT_SUFFIXES[f]}" for f in self.formats] + [
            self.output_dir / f"{stem}.json"
        ]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        array = (image.detach().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(image)).float()
        if array.ndim != 3 or array.shape[0] != 1:
            raise ValueError(f"Expected a generated image of shape (1, H, W), got {tuple(array.shape)}.")
        if not torch.isfinite(array).all():
            raise ValueError(
                "The generated image holds non-finite values (NaN or inf); nothing was written. Check the sampling "
                "settings (guidance_scale, eta) and that the weights are not corrupted."
            )
        array = array.clamp(0.0, 1.0).numpy()
        check_new_files(self.paths(d), self.overwrite)  # a concurrent run may have written them meanwhile
        stem = self.stem(d)
        affine = np.diag([*self.spacing, 1.0, 1.0])
        written = []
        if "nii.gz" in self.formats:
            path = self.output_dir / f"{stem}.nii.gz"
            writer = NibabelWriter(output_dtype=np.float32)
            writer.set_data_array(array, channel_dim=0)
            writer.set_metadata({"affine": affine, "original_affine": affine, "spatial_shape": array.shape[1:]})
            with atomic_path(path) as tmp:
                writer.write(str(tmp), verbose=False)
            written.append(path.name)
        for fmt, (dtype, scale) in PNG_DEPTHS.items():
            if fmt not in self.formats:
                continue
            path = self.output_dir / f"{stem}{FORMAT_SUFFIXES[fmt]}"
            writer = PILWriter(output_dtype=dtype, scale=scale)
            writer.set_data_array(array, channel_dim=0, squeeze_end_dims=True)
            writer.set_metadata({"spatial_shape": array.shape[1:]})
            with atomic_path(path) as tmp:
                writer.write(str(tmp), verbose=False)
            written.append(path.name)
        record = {**self.provenance, **self.sidecar, **{k: _plain(d[k]) for k in self.request_keys if k in d}}
        record["spacing_mm"] = list(self.spacing)
        record["files"] = written
        write_json(self.output_dir / f"{stem}.json", record)
        d["output_files"] = [str(self.output_dir / name) for name in written]
        return d


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
