"""Latents encoded once per data set: the frozen autoencoder's posterior moments, cached for diffusion training.

Diffusion training draws a latent ``z = z_mu + eps * z_sigma`` of every image at every step. The encoder is frozen,
so ``(z_mu, z_sigma)`` never change: encoding them once and drawing ``eps`` per step (as
:meth:`ScaledLatentSpace.sample` does) gives the same training distribution as re-encoding, without the encoder
pass that costs as much as the UNet's. Caching (in memory, and on disk under a name that carries the encoder's
fingerprint and the data set's identity) is :class:`common.data.encoded_cache.EncodedItemsCache`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from common.data.encoded_cache import EncodedItemsCache
from common.diffusion.latent_space import MU_KEY, SIGMA_KEY, ScaledLatentSpace


class LatentMomentsCache(EncodedItemsCache):
    """Items of a datalist -> the same items with ``z_mu`` and ``z_sigma`` ``(c, h, w)`` instead of the image.

    Args:
        latent_space: the frozen autoencoder's latent space (its scale factor is not needed: moments are unscaled).
        load, image_key, batch_size, device, cache_dir, enabled, progress, identity_keys: as for
            :class:`EncodedItemsCache`.
    """

    name = "latent_moments"

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
        identity_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(load, image_key, batch_size, device, cache_dir, enabled, progress, identity_keys=identity_keys)
        self.latent_space = latent_space

    def encoder_fingerprint(self) -> str:
        from common.networks.pairing import fingerprint

        return fingerprint("autoencoder", self.latent_space.autoencoder)

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, sigma = self.latent_space.moments(images)
        return {MU_KEY: mu, SIGMA_KEY: sigma}
