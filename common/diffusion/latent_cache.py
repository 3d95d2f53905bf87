"""Latents encoded once per data set: the frozen autoencoder's posterior moments, cached for diffusion training.

Diffusion training draws a latent ``z = z_mu + eps * z_sigma`` of every image at every step. The encoder is frozen,
so ``(z_mu, z_sigma)`` never change: encoding them once and drawing ``eps`` per step (as
:meth:`ScaledLatentSpace.sample` does) gives the same training distribution as re-encoding, without the encoder
pass that costs as much as the UNet's. The moments are kept in memory and, with ``cache_dir``, in a file whose name
carries the encoder's fingerprint and the data set's identity (paths, sizes, modification times): another
autoencoder or changed images give another file, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.diffusion.latent_space import MU_KEY, SIGMA_KEY, ScaledLatentSpace
from common.io.atomic import atomic_path

logger = logging.getLogger(__name__)


class LatentMomentsCache:
    """Items of a datalist -> the same items with ``z_mu`` and ``z_sigma`` ``(c, h, w)`` instead of the image.

    Args:
        latent_space: the frozen autoencoder's latent space (its scale factor is not needed: moments are unscaled).
        load: transform that turns one item into a dict whose ``image_key`` is the image ``(C, H, W)`` (the
            training config's loading transforms, without augmentation: cached latents are of the plain images).
        image_key: key of the image path in the items and of the loaded image.
        batch_size: images encoded together.
        device: where the encoder runs; the moments are stored on the CPU.
        cache_dir: folder for the cache file (created); ``None`` keeps the moments in memory only.
        enabled: ``False`` returns the items unchanged (each step then encodes its images).
        progress: show a progress bar while encoding.
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        load: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        image_key: str = "image",
        batch_size: int = 16,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        enabled: bool = True,
        progress: bool = True,
    ) -> None:
        self.latent_space = latent_space
        self.load = load
        self.image_key = image_key
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.enabled = bool(enabled)
        self.progress = progress

    def identity(self, items: Sequence[Mapping[str, Any]]) -> str:
        """16 hex characters naming these images encoded by this encoder (paths, sizes, mtimes, fingerprint)."""
        from common.networks.pairing import fingerprint

        digest = hashlib.sha256(fingerprint("autoencoder", self.latent_space.autoencoder).encode())
        for item in items:
            path = Path(str(item[self.image_key]))
            stat = path.stat()
            digest.update(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns]).encode())
        return digest.hexdigest()[:16]

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        items = [dict(item) for item in items]
        if not self.enabled or not items:
            return items
        path = None if self.cache_dir is None else self.cache_dir / f"latent_moments_{self.identity(items)}.pt"
        if path is not None and path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            mu, sigma = stored[MU_KEY], stored[SIGMA_KEY]
            logger.info("Latent moments of %d images read from %s", len(items), path)
        else:
            mu, sigma = self._encode(items)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    torch.save({MU_KEY: mu, SIGMA_KEY: sigma}, tmp)
                logger.info("Latent moments of %d images cached in %s", len(items), path)
        for item, m, s in zip(items, mu, sigma, strict=True):
            item.pop(self.image_key)
            item[MU_KEY], item[SIGMA_KEY] = m, s
        return items

    @torch.no_grad()
    def _encode(self, items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, c, h, w)`` moments of every item's image, encoded in batches."""
        mus, sigmas = [], []
        starts = range(0, len(items), self.batch_size)
        for start in tqdm(starts, desc="encoding latents", disable=not self.progress, leave=False):
            images = [self.load(item)[self.image_key] for item in items[start : start + self.batch_size]]
            batch = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image in images]).to(self.device)
            mu, sigma = self.latent_space.moments(batch)
            mus.append(mu.float().cpu())
            sigmas.append(sigma.float().cpu())
        return torch.cat(mus), torch.cat(sigmas)
