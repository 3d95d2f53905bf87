"""The latent space of a frozen autoencoder, scaled to unit variance."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import ignite.distributed as idist
import torch
from monai.networks.nets import AutoencoderKL

logger = logging.getLogger(__name__)

#: Batch keys of cached posterior moments (unscaled), written by ``common.diffusion.latent_cache``.
MU_KEY, SIGMA_KEY = "z_mu", "z_sigma"


class ScaledLatentSpace:
    """Frozen ``AutoencoderKL`` whose latents are multiplied by ``scale_factor``.

    Diffusion trains on ``encode(images)`` and sampling decodes with ``decode(latents)``. The scale
    factor makes the latents roughly unit variance (Rombach et al.); it is either given, or fitted as
    ``1 / std`` of training latents by :meth:`fit_scale_factor`, and it travels in the diffusion
    checkpoint through ``state_dict`` so inference never hard-codes it.

    Args:
        autoencoder: trained autoencoder; it is put in eval mode and frozen.
        scale_factor: known scale factor, or ``None`` to fit it before training.
    """

    def __init__(self, autoencoder: AutoencoderKL, scale_factor: float | None = None) -> None:
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = None if scale_factor is None else float(scale_factor)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction between image and latent (2 per level after the first)."""
        return 2 ** (len(self.autoencoder.encoder.channels) - 1)

    def _require_scale(self) -> float:
        if self.scale_factor is None:
            raise RuntimeError(
                "The latent scale factor is unknown: fit it (`fit_scale_factor`) or load it from the diffusion "
                "checkpoint before encoding or decoding."
            )
        return self.scale_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> scaled latents ``(B, latent_channels, H / f, W / f)``, ``f = downsample_factor``."""
        return self.autoencoder.encode_stage_2_inputs(images) * self._require_scale()

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` -> unscaled posterior mean and standard deviation, each ``(B, c, H / f, W / f)``."""
        return self.autoencoder.encode(images)

    def sample(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """Scaled latents drawn from cached moments: ``(z_mu + eps * z_sigma) * scale_factor``, fresh ``eps`` per call.

        The same distribution as :meth:`encode` (MONAI's ``encode_stage_2_inputs`` draws the same way), without
        running the encoder again: what makes cached-latent training exact.
        """
        return self.autoencoder.sampling(z_mu, z_sigma) * self._require_scale()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, latent_channels, h, w)`` -> images ``(B, C, h * f, w * f)``."""
        return self.autoencoder.decode_stage_2_outputs(latents / self._require_scale())

    @torch.no_grad()
    def fit_scale_factor(
        self, batches: Iterable[Mapping[str, Any]], image_key: str, device: torch.device | str, max_batches: int = 20
    ) -> float:
        """Set ``scale_factor = 1 / std`` of unscaled latents over up to ``max_batches`` batches (all ranks pooled)."""
        total = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum, sum of squares
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            if MU_KEY in batch:  # cached moments (common.diffusion.latent_cache): no encoder pass
                z = self.autoencoder.sampling(batch[MU_KEY].to(device), batch[SIGMA_KEY].to(device)).double()
            else:
                z = self.autoencoder.encode_stage_2_inputs(batch[image_key].to(device)).double()
            total += torch.stack([torch.tensor(z.numel(), dtype=torch.float64, device=device), z.sum(), (z * z).sum()])
        total = idist.all_reduce(total)
        count, s, ss = total.tolist()
        if count == 0:
            raise ValueError("No training batch to fit the latent scale factor on: the training datalist is empty.")
        std = math.sqrt(max(ss / count - (s / count) ** 2, 1e-12))
        self.scale_factor = 1.0 / std
        logger.info("Latent scale factor fitted on %d values: 1/std = %.5f", int(count), self.scale_factor)
        return self.scale_factor

    def state_dict(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value = state.get("scale_factor")
        self.scale_factor = None if value is None else float(value)
