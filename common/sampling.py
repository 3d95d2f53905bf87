"""Guided sampling of latent diffusion models and the sample requests that drive it."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from monai.transforms import MapTransform
from tqdm.auto import tqdm

from common.latent import ScaledLatentSpace, SchedulerSettings

logger = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "ddpm")


def check_sampling_settings(
    num_inference_steps: int, guidance_scale: float, scheduler: str, num_train_timesteps: int, eta: float = 0.0
):
    """Raise ``ValueError`` naming the bad knob before any sampling starts."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{scheduler}': use one of {', '.join(SCHEDULERS)}.")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` ({num_inference_steps}) exceeds the {num_train_timesteps} training timesteps."
        )
    if scheduler == "ddpm" and num_inference_steps != num_train_timesteps:
        # MONAI's DDPMScheduler.step always goes from t to t - 1, so a strided schedule decodes to noise.
        raise ValueError(
            f"The ddpm scheduler needs `num_inference_steps` equal to the {num_train_timesteps} training timesteps "
            f"(got {num_inference_steps}); for fewer steps use the ddim scheduler (with `eta` 1.0 for stochastic "
            "sampling)."
        )
    if guidance_scale < 0:
        raise ValueError(f"`guidance_scale` must be >= 0 (0: unconditional, 1: conditional), got {guidance_scale}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"`eta` must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta}.")


def latent_shape(image_size: Sequence[int], latent_space: ScaledLatentSpace) -> tuple[int, ...]:
    """``(latent_channels, H / f, W / f)`` for images of ``image_size`` ``(H, W)``; errors if not divisible."""
    f = latent_space.downsample_factor
    bad = [s for s in image_size if s % f]
    if bad or any(s <= 0 for s in image_size):
        raise ValueError(
            f"Image size {tuple(image_size)} is not divisible by the autoencoder's downsampling factor {f}: "
            f"use sizes that are multiples of {f} (e.g. {tuple(max(f, round(s / f) * f) for s in image_size)})."
        )
    return (latent_space.autoencoder.latent_channels, *(s // f for s in image_size))


def sample_requests(prompt: str, num_samples: int, seed: int, max_prompt_chars: int = 1000) -> list[dict[str, Any]]:
    """One dict per image to generate: ``{"prompt", "seed", "index"}``; sample ``i`` uses ``seed + i``.

    Seeding each sample on its own makes an image depend only on (prompt, seed), not on batch size.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError('`prompt` is empty: give a description, e.g. --prompt "T1-weighted image of a brain."')
    if len(prompt) > max_prompt_chars:
        raise ValueError(f"`prompt` has {len(prompt)} characters; CLIP reads at most 77 tokens (~300 characters).")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    return [{"prompt": prompt, "seed": seed + i, "index": i} for i in range(num_samples)]


def with_seeds(items: Sequence[Mapping[str, Any]], seed: int, prompt: str | None = None) -> list[dict[str, Any]]:
    """Copies of ``items`` with ``"seed": seed + i``, so that evaluating item ``i`` is reproducible on its own.

    A ``prompt`` other than ``None`` is added to every item as ``"prompt"`` (one prompt for a whole split).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    extra = {} if prompt is None else {"prompt": str(prompt)}
    return [{**item, **extra, "seed": seed + i} for i, item in enumerate(items)]


class SeededNoised(MapTransform):
    """Add ``noise``: a standard normal tensor of ``shape`` drawn from ``torch.Generator(seed)``.

    The seed is read from ``data[seed_key]``; noise is drawn on the CPU so that a seed gives the same
    image on every device.
    """

    def __init__(self, shape: Sequence[int], seed_key: str = "seed", noise_key: str = "noise") -> None:
        super().__init__(keys=[seed_key])
        self.shape = tuple(int(s) for s in shape)
        self.seed_key = seed_key
        self.noise_key = noise_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        generator = torch.Generator().manual_seed(int(d[self.seed_key]))
        d[self.noise_key] = torch.randn(self.shape, generator=generator)
        return d


class GuidedLatentSampler(Inferer):
    """Reverse diffusion in latent space with classifier-free guidance, then decoding.

    ``guidance_scale`` 0 samples unconditionally (empty-prompt context), 1 conditionally, and above 1
    extrapolates ``uncond + s * (cond - uncond)``; both branches run as one batch ``[uncond, cond]``.
    MONAI's own ``cfg`` uses a constant tensor as the unconditional input, which is not what the
    models were trained with, hence this inferer.

    Args:
        latent_space: frozen autoencoder + scale factor used to decode the final latents.
        settings: the training noise schedule (from the diffusion checkpoint).
        scheduler: ``"ddim"`` or ``"ddpm"`` (all the training timesteps only).
        num_inference_steps, guidance_scale: sampling knobs.
        eta: DDIM noise, 0 (deterministic given the starting noise) to 1 (as much fresh noise per step as DDPM,
            drawn from the per-sample generator, so still reproducible); ignored by ``"ddpm"``.
        progress: show a progress bar over denoising steps.
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        settings: SchedulerSettings,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        eta: float = 0.0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        check_sampling_settings(
            num_inference_steps, guidance_scale, scheduler, settings.values["num_train_timesteps"], eta=eta
        )
        self.latent_space = latent_space
        self.scheduler_name = scheduler
        self.scheduler = settings.build(scheduler)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.progress = progress

    @torch.no_grad()
    def sample_latents(
        self,
        noise: torch.Tensor,
        network: torch.nn.Module,
        context: torch.Tensor,
        uncond_context: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Noise ``(B, c, h, w)`` + contexts ``(B, 77, D)`` -> denoised scaled latents ``(B, c, h, w)``.

        ``model_kwargs`` (per-sample tensors ``(B, ...)``) go to :meth:`predict` at every step.
        """
        self.scheduler.set_timesteps(self.num_inference_steps, device=noise.device)
        scale = self.guidance_scale
        latents = noise
        steps = tqdm(self.scheduler.timesteps, desc="sampling", disable=not self.progress, leave=False)
        for t in steps:
            if scale in (0.0, 1.0):
                ctx = uncond_context if scale == 0.0 else context
                timesteps = t.expand(latents.shape[0]).to(latents.device)
                pred = self.predict(network, latents, timesteps, ctx, **model_kwargs)
            else:
                timesteps = t.expand(2 * latents.shape[0]).to(latents.device)
                doubled = {k: torch.cat([v, v]) for k, v in model_kwargs.items()}
                both = self.predict(
                    network, torch.cat([latents, latents]), timesteps, torch.cat([uncond_context, context]), **doubled
                )
                pred_uncond, pred_cond = both.chunk(2)
                pred = pred_uncond + scale * (pred_cond - pred_uncond)
            kwargs = {"eta": self.eta} if self.scheduler_name == "ddim" else {}
            if isinstance(generator, list | tuple):
                latents = torch.cat(
                    [
                        self.scheduler.step(pred[i : i + 1], int(t), latents[i : i + 1], generator=g, **kwargs)[0]
                        for i, g in enumerate(generator)
                    ]
                )
            else:
                latents, _ = self.scheduler.step(pred, int(t), latents, generator=generator, **kwargs)
        return latents

    @torch.no_grad()
    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        context: torch.Tensor,
        uncond_context: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Noise latents ``(B, c, h, w)`` -> images ``(B, C, H, W)``."""
        network.eval()
        latents = self.sample_latents(inputs, network, context, uncond_context, generator, **model_kwargs)
        return self.latent_space.decode(latents)

    def predict(
        self, network: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """One model output ``(B, c, h, w)`` for noisy ``latents`` at ``timesteps`` given ``context``."""
        return network(latents, timesteps=timesteps, context=context)
