"""Guidance distillation: a student UNet that gives the teacher's classifier-free guided output in one call.

Classifier-free guidance costs two UNet evaluations per step (``[uncond, cond]``). Meng et al. 2023 ("On
distillation of guided diffusion models", stage 1) train a student, initialised from the teacher, to output
``uncond + s * (cond - uncond)`` of the teacher from the conditional input alone; sampling then calls it once per
step (half the UNet work). Here the scale ``s`` is fixed at distillation (the bundle's default guidance); other
scales sample with the teacher. The student's weight file records the scale and the teacher's fingerprint
(:class:`DistillationRecord`), so a student is never used at a scale or beside a teacher it was not made for.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.diffusion.latent_space import ScaledLatentSpace
from common.diffusion.sampling import guided_output
from common.engines.precision import autocast, check_precision
from common.engines.prepare_batch import LatentDiffusionPrepareBatch
from common.io.weights import load_weights, state_fingerprint
from common.networks.text_encoder import CLIPPromptEncoder

logger = logging.getLogger(__name__)

#: Record key, inside a student's weight file, of its distillation (:class:`DistillationRecord`).
DISTILLATION_KEY = "guidance_distillation"

#: The teacher's file name in a bundle's ``models/`` (the student is ``diffusion_model_distilled.pt`` beside it).
TEACHER_FILE = "diffusion_model.pt"


class GuidanceDistillationPrepareBatch(LatentDiffusionPrepareBatch):
    """Batch dict -> noised-latent example whose target is the teacher's guided output at ``guidance_scale``.

    Latents, noise and timesteps are drawn as for training the teacher (cached moments, uniform timesteps); the
    ``DiffusionInferer`` noises the latents with the same noise and timesteps, so the student sees exactly the
    ``x_t`` the teacher was asked about. Prompts dropped to ``""`` (``PromptDropoutd``) give the unconditional
    output, which keeps the student's empty-prompt behaviour.

    Returns ``(latents, target, (), {"noise", "timesteps", "condition"})``; ``target`` ``(B, c, h, w)`` float32.

    Args:
        teacher: the trained UNet, frozen here (eval mode, no gradients).
        guidance_scale: the scale distilled (above 1).
        precision: ``"fp32"`` or ``"bf16"`` for the teacher's calls (the sampler's precision option).
        empty_prompt: the unconditional prompt the teacher was trained with.
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        prompt_encoder: CLIPPromptEncoder,
        scheduler: torch.nn.Module,
        teacher: torch.nn.Module,
        guidance_scale: float,
        precision: str = "fp32",
        image_key: str = "image",
        prompt_key: str = "caption",
        empty_prompt: str = "",
    ) -> None:
        super().__init__(latent_space, prompt_encoder, scheduler, image_key=image_key, prompt_key=prompt_key)
        self.guidance_scale = check_distilled_scale(guidance_scale)
        self.teacher = teacher.eval().requires_grad_(False)
        self.precision = check_precision(precision)
        self.empty_prompt = empty_prompt
        self._empty_context: torch.Tensor | None = None

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        latents = self.latents(batchdata, device, non_blocking, **kwargs)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        context = self.prompt_encoder(list(batchdata[self.prompt_key]))
        target = self.teacher_output(latents, noise, timesteps, context)
        return latents, target, (), {"noise": noise, "timesteps": timesteps, "condition": context}

    @torch.no_grad()
    def teacher_output(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's guided output ``(B, c, h, w)`` at the noised ``latents``."""
        noisy = self.scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
        uncond = self.empty_context(context.device).expand(latents.shape[0], -1, -1)
        self.teacher.eval()
        with autocast(self.precision, latents.device):
            out = guided_output(
                functools.partial(_call_unet, self.teacher), noisy, timesteps, self.guidance_scale, context, uncond
            )
        return out.float()

    def empty_context(self, device: torch.device) -> torch.Tensor:
        """The empty prompt's context ``(1, 77, D)``, encoded once: the frozen text tower gives it the same each batch."""
        if self._empty_context is None or self._empty_context.device != device:
            self._empty_context = self.prompt_encoder([self.empty_prompt]).to(device)
        return self._empty_context


def _call_unet(unet: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return unet(x, timesteps=timesteps, context=context)


def check_distilled_scale(scale: float) -> float:
    """``scale`` as a float; refused unless above 1 (at 0 and 1 guidance already costs one call)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 1.0:
        raise ValueError(f"The distilled guidance scale must be a number above 1, got {scale!r}.")
    return float(scale)


class DistillationRecord:
    """Exported beside the student's weights (``"guidance_distillation"`` entry): the scale and the teacher.

    ``state_dict()`` ``{"guidance_scale": s, "teacher": fingerprint}``; the fingerprint is the teacher's whole state
    (:func:`common.io.weights.state_fingerprint`), taken at export.
    """

    def __init__(self, teacher: torch.nn.Module, guidance_scale: float) -> None:
        self.teacher = teacher
        self.guidance_scale = check_distilled_scale(guidance_scale)

    def state_dict(self) -> dict[str, Any]:
        return {"guidance_scale": self.guidance_scale, "teacher": teacher_fingerprint(self.teacher)}


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """Fingerprint of the teacher UNet's weights (a DDP wrapper is looked through)."""
    return state_fingerprint(getattr(teacher, "module", teacher).state_dict(), None)


def distilled_scale(weights: Mapping[str, Any]) -> float | None:
    """The guidance scale a loaded weight file was distilled for, or ``None`` for an ordinary diffusion model."""
    record = weights.get(DISTILLATION_KEY)
    return None if record is None else float(record["guidance_scale"])


def choose_distilled_weights(
    distilled_path: str | Path,
    guidance_distillation: str | bool,
    guidance_scale: float,
    guidance_interval: Sequence[float] | None,
    diffusion_weights: Mapping[str, Any],
    diffusion_path: str | Path,
) -> dict[str, Any] | None:
    """The guidance-distilled student's weights to sample with, or ``None`` to sample with the diffusion model.

    A student serves when its file exists, it was distilled at ``guidance_scale`` from ``diffusion_weights`` (the
    teacher's fingerprint), and no ``guidance_interval`` is asked (it guides every step). ``guidance_distillation``
    ``"auto"`` takes it where it serves and otherwise samples with the diffusion model (saying why in the log: a
    student beside other diffusion weights, ``--diffusion_path`` pointed elsewhere, is not an error); ``True``
    insists on it (anything that keeps it from serving is an error naming the fix); ``False`` never takes it.
    """
    if not (guidance_distillation == "auto" or isinstance(guidance_distillation, bool)):
        raise ValueError(f"`guidance_distillation` must be 'auto', True or False, got {guidance_distillation!r}.")
    if guidance_distillation is False:
        return None
    path = Path(distilled_path)
    if not path.is_file():
        if guidance_distillation is True:
            raise FileNotFoundError(
                f"--guidance_distillation True needs the distilled model {path}; make it with configs/"
                "distill_guidance.json, or sample with the diffusion model (--guidance_distillation False)."
            )
        return None
    weights = load_weights(path)
    record = weights.get(DISTILLATION_KEY)
    reasons = []
    if record is None:
        reasons.append(f"it has no {DISTILLATION_KEY!r} record (not made by configs/distill_guidance.json)")
    else:
        if float(record["guidance_scale"]) != float(guidance_scale):
            reasons.append(
                f"it was distilled at guidance {record['guidance_scale']:g}, and {guidance_scale:g} is asked"
            )
        if record["teacher"] != state_fingerprint(diffusion_weights["unet"]):
            reasons.append(f"it was distilled from another diffusion model than {diffusion_path}")
    if guidance_interval is not None:
        reasons.append("it guides every step, and a guidance interval is asked")
    if not reasons:
        return weights
    if guidance_distillation is True:
        raise ValueError(
            f"The distilled model {path} cannot sample here: {'; '.join(reasons)}. Use --guidance_distillation auto "
            "or False (the diffusion model samples any guidance), or distil one for these settings "
            "(configs/distill_guidance.json)."
        )
    logger.info("Sampling with the diffusion model, not the distilled %s: %s.", path.name, "; ".join(reasons))
    return None
