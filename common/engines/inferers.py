"""Training and evaluation inferers: autoencoder reconstruction, ControlNet + frozen UNet forward pass."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import ControlNetDiffusionInferer, Inferer


class ReconstructionInferer(Inferer):
    """Run an ``AutoencoderKL`` and keep only the reconstruction ``(B, C, H, W)`` (not ``z_mu``, ``z_sigma``)."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return network(inputs, *args, **kwargs)[0]


class ControlNetTrainingInferer(Inferer):
    """Training forward pass: noise the latents, run the ControlNet, add its residuals to the frozen UNet.

    The ControlNet is the engine's ``network`` (the trained one); the frozen UNet is held here. The
    computation is MONAI's ``ControlNetDiffusionInferer``, which is called with the networks in the
    order it expects.

    Called as ``inferer(latents, controlnet, noise=, timesteps=, condition=, controlnet_cond=)`` with
    latents ``(B, c, h, w)``, text context ``(B, 77, D)`` and the condition image ``(B, 1, H, W)``;
    returns the UNet's prediction ``(B, c, h, w)``.
    """

    def __init__(self, scheduler: torch.nn.Module, diffusion_model: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.inferer = ControlNetDiffusionInferer(scheduler)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        controlnet_cond: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.inferer(
            inputs, self.diffusion_model, network, noise, timesteps, cn_cond=controlnet_cond, condition=condition
        )
