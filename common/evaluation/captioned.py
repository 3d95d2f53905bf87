"""Generation from the test set's own text, with the sampler users sample with: realism and condition adherence.

The unconditional figures (FID and diversity at guidance 0) say whether the model learned the image distribution;
they say nothing about the guided sampling a user runs. Here every real test image gets one generated image from its
own text (a brain slice's caption, a radiograph's report), sampled with the inference settings (guidance scale and
interval, steps, precision, the guidance-distilled UNet where inference uses it), and the generated set is judged
against the real test images (FID, diversity) and against the facts of each study (an adherence measure: the brain
measures, or the finding classifier), next to the same scores of the real images, which bound them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from common.diffusion.sampling import GuidedLatentSampler
from common.evaluation.generation import generate_images
from common.metrics.fid import frechet_distance
from common.metrics.ms_ssim import pairwise_ms_ssim
from common.networks.text_encoder import CLIPPromptEncoder

logger = logging.getLogger(__name__)


class TextAdherence(Protocol):
    """How well images show the facts of the studies they stand for
    (:class:`common.evaluation.brain_measures.BrainMeasureAdherence`,
    :class:`common.evaluation.findings.FindingAdherence`)."""

    description: str

    def __call__(self, entries: Sequence[Mapping[str, Any]], images: torch.Tensor) -> dict[str, Any]: ...

    def metrics(self, scores: Mapping[str, Any]) -> dict[str, float | None]: ...

    def summary(self, generated: Mapping[str, Any], real: Mapping[str, Any]) -> list[dict[str, Any]]: ...


class CaptionedGeneration:
    """One generated image per test image, from the study's own text (sample ``i`` from noise seeded ``seed + i``).

    Args:
        sampler: the guided sampler being judged (the inference defaults: guidance, interval, steps, precision).
        entries: the test datalist entries, in the order of the real images; each has a text under one of
            ``prompt_keys`` and the facts ``adherence`` reads.
        adherence: scores images against the entries' facts.
        seed: seed of the first sample.
        batch_size: images per sampling batch.
        prompt_keys: entry keys of the prompt, the first non-empty one is used (``("impression", "findings")``: a
            report's impression, or its findings where it has none).
        network: the UNet ``sampler`` runs (a guidance-distilled student, say), or ``None`` for the one the
            caller passes.
    """

    def __init__(
        self,
        sampler: GuidedLatentSampler,
        entries: Sequence[Mapping[str, Any]],
        adherence: TextAdherence,
        seed: int = 0,
        batch_size: int = 16,
        prompt_keys: Sequence[str] = ("caption",),
        network: torch.nn.Module | None = None,
    ) -> None:
        self.prompt_keys = (prompt_keys,) if isinstance(prompt_keys, str) else tuple(prompt_keys)
        self.entries = list(entries)
        self.prompts = [self._prompt(entry) for entry in self.entries]
        missing = [i for i, prompt in enumerate(self.prompts) if not prompt]
        if missing:
            raise ValueError(
                f"{len(missing)} test entries have no caption (first: index {missing[0]}): this evaluation needs a "
                f"text under {list(self.prompt_keys)} for every entry (make-brain-phantoms and make-cxr-phantoms "
                "write them)."
            )
        self.sampler = sampler
        self.adherence = adherence
        self.seed = seed
        self.batch_size = batch_size
        self.network = network

    def _prompt(self, entry: Mapping[str, Any]) -> str:
        for key in self.prompt_keys:
            if text := str(entry.get(key) or "").strip():
                return text
        return ""

    @property
    def num_images(self) -> int:
        return len(self.entries)

    def __call__(
        self,
        network: torch.nn.Module,
        prompt_encoder: CLIPPromptEncoder,
        latent_shape: Sequence[int],
        device: torch.device | str,
        real: torch.Tensor,
        feature_extractor: Callable[[torch.Tensor], torch.Tensor],
        real_features: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Generate, then score against ``real`` ``(N, 1, H, W)`` (the entries' images, same order).

        ``real_features`` are ``feature_extractor(real)`` where the caller has them already.
        """
        if real.shape[0] != len(self.entries):
            raise ValueError(f"{real.shape[0]} real images for {len(self.entries)} test entries.")
        fake = generate_images(
            self.sampler,
            network if self.network is None else self.network,
            prompt_encoder,
            latent_shape,
            len(self.entries),
            self.seed,
            prompt=self.prompts,
            batch_size=self.batch_size,
            device=device,
        )
        diversity, diversity_std = pairwise_ms_ssim(fake, seed=self.seed)
        generated = self.adherence(self.entries, fake)
        ceiling = self.adherence(self.entries, real)
        sampler = self.sampler
        return {
            "num_samples": int(fake.shape[0]),
            "prompts": f"each test study's {' or '.join(self.prompt_keys)}, one sample each",
            "guidance_scale": sampler.guidance_scale,
            "guidance_interval": None if sampler.guidance_interval is None else list(sampler.guidance_interval),
            "guided_steps": sampler.guided_steps(),
            "distilled_guidance": sampler.distilled_guidance,
            "num_inference_steps": sampler.num_inference_steps,
            "eta": sampler.eta,
            "scheduler": sampler.scheduler_name,
            "precision": sampler.precision,
            "fid": frechet_distance(
                feature_extractor(real) if real_features is None else real_features, feature_extractor(fake)
            ),
            "diversity_ms_ssim": diversity,
            "diversity_ms_ssim_std": diversity_std,
            "condition_adherence": {
                "measured_by": self.adherence.description,
                "generated": generated,
                "real_test_images": ceiling,
                "summary": self.adherence.summary(generated, ceiling),
            },
        }

    def metrics(self, result: Mapping[str, Any]) -> dict[str, float]:
        """The headline figures of a result of this class, flat and rounded (``None`` ones left out)."""
        values = {
            "captioned_fid": result["fid"],
            "captioned_diversity_ms_ssim": result["diversity_ms_ssim"],
            **self.adherence.metrics(result["condition_adherence"]["generated"]),
        }
        return {name: round(float(value), 4) for name, value in values.items() if value is not None}
