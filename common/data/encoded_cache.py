"""What a frozen encoder makes of a data set's images, computed once and cached for the training that follows.

A stage trained on the outputs of a frozen network (latent diffusion on an autoencoder's posterior moments, an
unCLIP prior on CLIP image embeddings) would otherwise run that network on every image at every step, for the
same result. :class:`EncodedItemsCache` encodes every item once, adds the results to the items, and, with
``cache_dir``, keeps them in a file whose name carries the encoder's fingerprint and the data set's identity
(paths, sizes, modification times): another encoder or changed images give another file, so a stale cache is
never read. Subclasses say what the encoder is and what it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.io.atomic import atomic_path

logger = logging.getLogger(__name__)


class EncodedItemsCache(ABC):
    """Items of a datalist -> the same items with the encoder's outputs added (and the image path dropped or kept).

    Args:
        load: transform that turns one item into a dict whose ``image_key`` is the image ``(C, H, W)`` (the
            training config's loading transforms, without augmentation: the cache holds the plain images' codes).
        image_key: key of the image path in the items and of the loaded image.
        batch_size: images encoded together.
        device: where the encoder runs; the outputs are stored on the CPU.
        cache_dir: folder for the cache file (created); ``None`` keeps the outputs in memory only.
        enabled: ``False`` returns the items unchanged (each step then encodes its images).
        progress: show a progress bar while encoding.
        keep_image: keep ``image_key`` in the items (a later stage still loads the image); dropped by default.
        identity_keys: item keys besides the image path whose values change what ``load`` gives (a ``mirrored``
            flag, :mod:`common.data.mirroring`); they enter the cache file's name.
    """

    #: File name prefix of the cache files, and the progress bar's word for what is computed.
    name: str = "encoded"

    def __init__(
        self,
        load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        image_key: str = "image",
        batch_size: int = 16,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        enabled: bool = True,
        progress: bool = True,
        keep_image: bool = False,
        identity_keys: Sequence[str] = (),
    ) -> None:
        self.load = load
        self.image_key = image_key
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.enabled = bool(enabled)
        self.progress = progress
        self.keep_image = bool(keep_image)
        self.identity_keys = tuple(identity_keys)

    @abstractmethod
    def encoder_fingerprint(self) -> str:
        """A string that changes whenever the encoder's outputs could (``common.networks.pairing.fingerprint``)."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images ``(B, C, H, W)`` on ``device`` -> ``{item key: (B, ...)}``, the values added to each item."""

    def identity(self, items: Sequence[Mapping[str, Any]]) -> str:
        """16 hex characters naming these images encoded by this encoder (paths, sizes, mtimes, identity keys'
        values, fingerprint)."""
        digest = hashlib.sha256(self.encoder_fingerprint().encode())
        for item in items:
            path = Path(str(item[self.image_key]))
            stat = path.stat()
            flags = [item.get(key) for key in self.identity_keys]
            digest.update(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, *flags]).encode())
        return digest.hexdigest()[:16]

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        items = [dict(item) for item in items]
        if not self.enabled or not items:
            return items
        path = None if self.cache_dir is None else self.cache_dir / f"{self.name}_{self.identity(items)}.pt"
        if path is not None and path.is_file():
            outputs = torch.load(path, map_location="cpu", weights_only=True)
            logger.info("%s of %d images read from %s", self.name, len(items), path)
        else:
            outputs = self._encode_all(items)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    torch.save(outputs, tmp)
                logger.info("%s of %d images cached in %s", self.name, len(items), path)
        for index, item in enumerate(items):
            if not self.keep_image:
                item.pop(self.image_key)
            # A copy, not a view: MONAI's CacheDataset deep-copies every item it serves, and the deep copy of a view
            # copies the whole (N, ...) storage behind it, so each step would cost time in proportion to N.
            item.update({key: values[index].clone() for key, values in outputs.items()})
        return items

    @torch.no_grad()
    def _encode_all(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """``{key: (N, ...)}`` for every item's image, encoded in batches."""
        parts: dict[str, list[torch.Tensor]] = {}
        starts = range(0, len(items), self.batch_size)
        for start in tqdm(starts, desc=f"encoding {self.name}", disable=not self.progress, leave=False):
            images = [self.load(item)[self.image_key] for item in items[start : start + self.batch_size]]
            batch = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image in images]).to(self.device)
            for key, value in self.encode(batch).items():
                parts.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in parts.items()}
