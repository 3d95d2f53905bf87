"""Guided sampling of latent diffusion models (classifier-free guidance, optional ControlNet)."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from monai.inferers import Inferer
from tqdm.auto import tqdm

from common.diffusion.latent_space import ScaledLatentSpace
from common.diffusion.schedules import SchedulerSettings
from common.engines.precision import autocast, check_precision

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


def check_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """``None`` (guide every step) or ``(low, high)`` noise levels with ``0 <= low < high``, as floats."""
    if interval is None:
        return None
    if isinstance(interval, str) or len(interval) != 2:
        raise ValueError(
            f"`guidance_interval` must be null (guide every step) or two noise levels [low, high], got {interval!r}."
        )
    low, high = (float(v) for v in interval)
    if not 0.0 <= low < high:
        raise ValueError(
            f"`guidance_interval` [low, high] needs 0 <= low < high (noise levels sigma), got [{low}, {high}]."
        )
    return low, high


def check_distilled_guidance(
    distilled: float | None, guidance_scale: float, guidance_interval: tuple[float, float] | None
) -> float | None:
    """``distilled`` as a float (or ``None``); refused unless the sampler asks exactly the guidance it gives."""
    if distilled is None:
        return None
    distilled = float(distilled)
    if guidance_scale != distilled or guidance_interval is not None:
        asked = f"guidance {guidance_scale:g}" + ("" if guidance_interval is None else f" in {list(guidance_interval)}")
        raise ValueError(
            f"The network is guidance-distilled for guidance {distilled:g} at every step; {asked} is asked. Sample "
            "with the diffusion model it was distilled from (--guidance_distillation False)."
        )
    return distilled


def noise_level(alphas_cumprod: torch.Tensor, timestep: int) -> float:
    """The noise-to-signal ratio ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` of a training timestep."""
    alpha_bar = float(alphas_cumprod[int(timestep)])
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def guided_output(
    predict: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    scale: float,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    model_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Classifier-free guided output ``uncond + scale * (cond - uncond)`` ``(B, c, h, w)``.

    ``predict(latents, timesteps, context, **model_kwargs)`` is the model; ``timesteps`` ``(B,)``, contexts
    ``(B, 77, D)``. Guidance 0 and 1 make one call of ``B`` samples (the other half would be thrown away), other
    scales one call of ``2B`` (``[uncond, cond]``). The sampler and guidance distillation's teacher both use it.
    """
    model_kwargs = dict(model_kwargs or {})
    if scale in (0.0, 1.0):
        return predict(latents, timesteps, uncond_context if scale == 0.0 else context, **model_kwargs)
    doubled = {k: torch.cat([v, v]) for k, v in model_kwargs.items()}
    both = predict(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        torch.cat([uncond_context, context]),
        **doubled,
    )
    pred_uncond, pred_cond = both.chunk(2)
    return pred_uncond + scale * (pred_cond - pred_uncond)


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


#: The knobs :meth:`GuidedLatentSampler.replaced` may change (the scheduler kind and latent space are fixed).
_REPLACEABLE = frozenset(
    {
        "num_inference_steps",
        "guidance_scale",
        "eta",
        "progress",
        "precision",
        "guidance_interval",
        "compile",
        "conditioning_scale",
        "distilled_guidance",
    }
)


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
        precision: ``"fp32"``, or ``"bf16"``: the network calls run under bfloat16 autocast (on a CPU with native
            bf16, or a GPU, about 1.5x faster per UNet call); the scheduler and decoding stay in float32.
        guidance_interval: ``None`` guides every step; ``(low, high)`` guides only the steps whose noise level
            ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` lies in ``(low, high]`` and runs the others
            conditionally (one network call of ``B`` instead of ``2B``). Kynkaanniemi et al. 2024 ("Applying
            guidance in a limited interval improves sample and distribution quality in diffusion models") found
            guidance harmful at high noise and useless at low noise. Ignored at guidance 0 and 1.
        compile: run the network calls through ``torch.compile`` (one static graph per batch size, built on the first
            call: minutes on a CPU, seconds once inductor's on-disk cache holds it; then faster steps). For bulk
            generation and evaluation; the outputs equal the eager ones up to float rounding.
        distilled_guidance: ``None``, or the scale the network was guidance-distilled for
            (:mod:`common.diffusion.distillation`): it gives the guided output from the conditional input alone, so
            each step is one call of ``B``. ``guidance_scale`` must then be that scale, without an interval.
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
        precision: str = "fp32",
        guidance_interval: Sequence[float] | None = None,
        compile: bool = False,
        distilled_guidance: float | None = None,
    ) -> None:
        super().__init__()
        self.compile = bool(compile)
        self._compiled: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
        self.precision = check_precision(precision)
        self.guidance_interval = check_guidance_interval(guidance_interval)
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
        self.distilled_guidance = check_distilled_guidance(
            distilled_guidance, self.guidance_scale, self.guidance_interval
        )

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
        latents = noise
        steps = tqdm(self.scheduler.timesteps, desc="sampling", disable=not self.progress, leave=False)
        for t in steps:
            scale = self.step_guidance_scale(int(t))
            with autocast(self.precision, latents.device):
                pred = self._guided_prediction(network, latents, t, scale, context, uncond_context, model_kwargs)
            pred = pred.float()
            kwargs = {"eta": self.eta} if self.scheduler_name == "ddim" else {}
            if isinstance(generator, list | tuple) and self.draws_noise:
                latents = torch.cat(
                    [
                        self.scheduler.step(pred[i : i + 1], int(t), latents[i : i + 1], generator=g, **kwargs)[0]
                        for i, g in enumerate(generator)
                    ]
                )
            else:  # one step for the batch: no noise is drawn, or one generator draws it for all
                latents, _ = self.scheduler.step(
                    pred,
                    int(t),
                    latents,
                    generator=None if isinstance(generator, list | tuple) else generator,
                    **kwargs,
                )
        return latents

    @property
    def draws_noise(self) -> bool:
        """Whether a denoising step draws noise (DDPM, DDIM with ``eta`` above 0): then each sample's comes from its
        own generator, one scheduler step per sample; deterministic DDIM steps the whole batch at once."""
        return self.scheduler_name == "ddpm" or self.eta > 0.0

    def step_guidance_scale(self, timestep: int) -> float:
        """The guidance scale of the step at training ``timestep``: 1 (conditional) outside the guidance interval,
        and at every step of a guidance-distilled network (its conditional output is the guided one)."""
        if self.distilled_guidance is not None:
            return 1.0
        if self.guidance_interval is None or self.guidance_scale in (0.0, 1.0):
            return self.guidance_scale
        low, high = self.guidance_interval
        sigma = noise_level(self.scheduler.alphas_cumprod, timestep)
        return self.guidance_scale if low < sigma <= high else 1.0

    def guided_steps(self) -> int:
        """How many of the ``num_inference_steps`` steps call the network on ``[uncond, cond]`` (``2B`` samples)."""
        if self.guidance_scale in (0.0, 1.0) or self.distilled_guidance is not None:
            return 0
        self.scheduler.set_timesteps(self.num_inference_steps)
        return sum(self.step_guidance_scale(int(t)) not in (0.0, 1.0) for t in self.scheduler.timesteps)

    def _guided_prediction(
        self,
        network: torch.nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        scale: float,
        context: torch.Tensor,
        uncond_context: torch.Tensor,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The guided model output at step ``t``: one network call of ``B`` (guidance 0 or 1) or ``2B`` samples."""
        timesteps = t.expand(latents.shape[0]).to(latents.device)
        return guided_output(
            functools.partial(self.predict, network), latents, timesteps, scale, context, uncond_context, model_kwargs
        )

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
        latents = self.sample_latents(
            inputs, self.compiled(network), context, uncond_context, generator, **model_kwargs
        )
        return self.latent_space.decode(latents)

    def replaced(self, **changes: Any) -> GuidedLatentSampler:
        """A copy with some knobs changed (``precision``, ``guidance_scale``, ``num_inference_steps``,
        ``guidance_interval``, ``compile``, ...), checked as at construction; ``self`` is left as it was.

        The copy has its own scheduler (``set_timesteps`` is state) and its own compiled networks.
        """
        unknown = sorted(name for name in changes if name not in _REPLACEABLE or not hasattr(self, name))
        if unknown:
            raise ValueError(f"Unknown sampler settings {unknown}: replaceable are {sorted(_REPLACEABLE)}.")
        other = copy.copy(self)
        other.__dict__.update(changes)
        other.scheduler = copy.deepcopy(self.scheduler)
        other._compiled = {}
        other.precision = check_precision(other.precision)
        other.guidance_interval = check_guidance_interval(other.guidance_interval)
        other.guidance_scale, other.compile = float(other.guidance_scale), bool(other.compile)
        other.distilled_guidance = check_distilled_guidance(
            other.distilled_guidance, other.guidance_scale, other.guidance_interval
        )
        check_sampling_settings(
            other.num_inference_steps,
            other.guidance_scale,
            other.scheduler_name,
            len(other.scheduler.alphas_cumprod),
            eta=other.eta,
        )
        return other

    def compiled(self, network: torch.nn.Module) -> torch.nn.Module:
        """``network`` itself, or with ``compile`` its ``torch.compile`` wrapper (made once per network)."""
        if not self.compile:
            return network
        entry = self._compiled.get(id(network))
        if entry is None or entry[0] is not network:
            entry = (network, torch.compile(network, dynamic=False))
            self._compiled[id(network)] = entry
        return entry[1]

    def predict(
        self, network: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """One model output ``(B, c, h, w)`` for noisy ``latents`` at ``timesteps`` given ``context``."""
        return network(latents, timesteps=timesteps, context=context)


class ControlNetGuidedSampler(GuidedLatentSampler):
    """Guided latent sampling where a ControlNet steers the frozen UNet at every step.

    The engine's ``network`` is the ControlNet; ``controlnet_cond`` ``(B, 1, H, W)`` is the condition
    image at full resolution (the ControlNet's conditioning embedding downsamples it to latent size).
    Both guidance branches see the same condition. ``conditioning_scale`` multiplies the residuals
    (0 ignores the condition, 1 is what training used).
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        settings: SchedulerSettings,
        diffusion_model: torch.nn.Module,
        conditioning_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(latent_space, settings, **kwargs)
        self.diffusion_model = diffusion_model
        self.conditioning_scale = _check_conditioning_scale(conditioning_scale)

    def replaced(self, **changes: Any) -> ControlNetGuidedSampler:
        other = super().replaced(**changes)
        other.conditioning_scale = _check_conditioning_scale(other.conditioning_scale)
        return other

    @torch.no_grad()
    def sample_latents(  # type: ignore[override]
        self,
        noise: torch.Tensor,
        network: torch.nn.Module,
        context: torch.Tensor,
        uncond_context: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        controlnet_cond: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """As :meth:`GuidedLatentSampler.sample_latents`, with the condition image embedded once, not at every step.

        The ControlNet's conditioning embedding of the full-resolution condition depends on nothing else, yet it
        is about a third of a guided step; it is computed here once per batch and the network's embedding module is
        bypassed while sampling (restored afterwards, also on error).
        """
        if controlnet_cond is None:
            raise ValueError("ControlNet sampling needs `controlnet_cond`, the condition image (B, 1, H, W).")
        core = getattr(network, "_orig_mod", network)  # a torch.compile wrapper is looked through,
        core = getattr(core, "module", core)  # and a DistributedDataParallel one
        embedded = core.controlnet_cond_embedding(controlnet_cond)
        with _precomputed_condition(core):
            return super().sample_latents(
                noise, network, context, uncond_context, generator, controlnet_cond=embedded, **model_kwargs
            )

    def predict(  # type: ignore[override]
        self,
        network: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        controlnet_cond: torch.Tensor,
    ) -> torch.Tensor:
        down, mid = network(
            x=latents,
            timesteps=timesteps,
            controlnet_cond=controlnet_cond,
            conditioning_scale=self.conditioning_scale,
            context=context,
        )
        return self.compiled(self.diffusion_model)(
            latents,
            timesteps=timesteps,
            context=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )


def _check_conditioning_scale(scale: float) -> float:
    if not scale >= 0:
        raise ValueError(f"`conditioning_scale` must be >= 0 (1 is what training used), got {scale}.")
    return float(scale)


#: One identity for every swap: a compiled ControlNet sees the same module each time, so it is not recompiled.
_IDENTITY = torch.nn.Identity()


@contextmanager
def _precomputed_condition(controlnet: torch.nn.Module) -> Iterator[None]:
    """Let ``controlnet`` take an already embedded condition: its embedding module is an identity meanwhile."""
    embedding = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = _IDENTITY
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = embedding
