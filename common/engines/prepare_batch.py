"""``prepare_batch`` objects: batch dicts -> the inputs of autoencoder, latent diffusion and ControlNet engines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch, PrepareBatch

from common.diffusion.latent_space import MU_KEY, SIGMA_KEY, ScaledLatentSpace
from common.networks.text_encoder import CLIPPromptEncoder


class AutoencoderPrepareBatch(PrepareBatch):
    """Batch dict -> ``(image, image)``: the autoencoder reconstructs its input."""

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return images, images


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Batch dict -> noised-latent training example for a text-conditioned latent diffusion UNet.

    Images ``(B, C, H, W)`` are encoded into scaled latents ``(B, c, H/f, W/f)`` by the frozen
    autoencoder here, not inside the inferer, because the v-prediction target needs the latent. A batch that
    carries cached posterior moments (``z_mu``, ``z_sigma``: :mod:`common.diffusion.latent_cache`) is not encoded
    again: its latents are drawn from the moments, the same distribution at a fraction of the cost.
    Prompts (``B`` strings, already dropped to ``""`` by ``PromptDropoutd`` where chosen) become the
    cross-attention context ``(B, 77, D)``.

    Returns ``(latents, target, (), {"noise", "timesteps", "condition"})`` for ``DiffusionInferer``;
    the target follows the scheduler's ``prediction_type`` (``v_prediction``, ``epsilon`` or ``sample``).
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        prompt_encoder: CLIPPromptEncoder,
        scheduler: torch.nn.Module,
        image_key: str = "image",
        prompt_key: str = "caption",
    ) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        self.latent_space = latent_space
        self.prompt_encoder = prompt_encoder
        self.scheduler = scheduler
        self.image_key = image_key
        self.prompt_key = prompt_key

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.prediction_type
        if kind == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        if kind == "sample":
            return images
        return noise

    def latents(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        """Scaled latents of the batch: drawn from cached moments when the batch has them, else encoded now."""
        if MU_KEY in batchdata:
            mu, sigma = (
                batchdata[k].to(device=device, non_blocking=non_blocking, **kwargs) for k in (MU_KEY, SIGMA_KEY)
            )
            return self.latent_space.sample(mu, sigma)
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return self.latent_space.encode(images)

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        latents = self.latents(batchdata, device, non_blocking, **kwargs)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        target = self.get_target(latents, noise, timesteps)
        context = self.prompt_encoder(list(batchdata[self.prompt_key]))
        return latents, target, (), {"noise": noise, "timesteps": timesteps, "condition": context}


class PromptSamplingPrepareBatch(PrepareBatch):
    """Batch of sample requests -> ``(noise, label, (), {"context", "uncond_context", "generator", ...})``.

    ``noise`` ``(B, c, h, w)`` comes from the ``SeededNoised`` transform; the unconditional context is
    the embedding of the empty prompt, which is what training's prompt dropout taught the model.
    ``label`` is ``batch[label_key]`` (e.g. the true image when evaluating a translation) or ``None``.
    ``condition_keys`` maps extra sampler arguments to batch keys, e.g. ``{"controlnet_cond": "condition"}``.
    """

    def __init__(
        self,
        prompt_encoder: CLIPPromptEncoder,
        noise_key: str = "noise",
        prompt_key: str = "prompt",
        seed_key: str = "seed",
        empty_prompt: str = "",
        label_key: str | None = None,
        condition_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.prompt_encoder = prompt_encoder
        self.seed_key = seed_key
        self.noise_key = noise_key
        self.prompt_key = prompt_key
        self.empty_prompt = empty_prompt
        self.label_key = label_key
        self.condition_keys = dict(condition_keys or {})

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        noise = batchdata[self.noise_key].to(device=device, non_blocking=non_blocking, **kwargs)
        prompts = list(batchdata[self.prompt_key])
        context = self.prompt_encoder(prompts).to(device)
        uncond = self.prompt_encoder([self.empty_prompt] * len(prompts)).to(device)
        # DDPM and DDIM with eta > 0 draw noise while sampling: one generator per sample keeps an image a function
        # of its seed, whatever the batch.
        generator = [torch.Generator(device=noise.device).manual_seed(int(s)) for s in batchdata[self.seed_key]]
        label = None
        if self.label_key is not None:
            label = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        extra = {
            name: batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)
            for name, key in self.condition_keys.items()
        }
        return noise, label, (), {"context": context, "uncond_context": uncond, "generator": generator, **extra}


class ControlNetPrepareBatch(LatentDiffusionPrepareBatch):
    """Like ``LatentDiffusionPrepareBatch``, plus the condition image ``batch[condition_key]`` ``(B, 1, H, W)``.

    Returns ``(latents, target, (), {"noise", "timesteps", "condition", "controlnet_cond"})`` for
    :class:`ControlNetTrainingInferer`.
    """

    def __init__(self, *args: Any, condition_key: str = "condition", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.condition_key = condition_key

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        latents, target, args, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        cond = batchdata[self.condition_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return latents, target, args, {**extra, "controlnet_cond": cond}
