"""Condition adherence of a text-to-image model: does an image show the finding its prompt states?

For each finding, images are generated from prompts that state it and from prompts that negate it, and a finding
classifier scores all of them. The AUROC of the classifier's score for that finding, with "the prompt stated it"
as the truth, is the finding's adherence: 1.0 when every stated-finding image scores above every negated-finding
image, 0.5 when the prompt makes no difference. The classifier's own AUROC on real images bounds what the metric
can reach (``train-finding-classifier`` prints it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.diffusion.sampling import GuidedLatentSampler
from common.evaluation.findings import finding_auroc
from common.evaluation.generation import generate_images

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FindingPrompts:
    """Prompts that state one finding and prompts that negate it (each non-empty, none empty)."""

    finding: str
    stated: tuple[str, ...]
    negated: tuple[str, ...]

    def __post_init__(self) -> None:
        for side in ("stated", "negated"):
            prompts = getattr(self, side)
            if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(
                    f"{self.finding}: '{side}' must be a non-empty list of non-empty prompts, got {prompts!r}."
                )
            object.__setattr__(self, side, tuple(prompts))

    @classmethod
    def from_mapping(cls, prompts: Mapping[str, Mapping[str, Sequence[str]]]) -> list[FindingPrompts]:
        """``{finding: {"stated": [...], "negated": [...]}}`` (the config layout) -> one entry per finding."""
        entries = []
        for finding, sides in prompts.items():
            if not isinstance(sides, Mapping) or set(sides) != {"stated", "negated"}:
                raise ValueError(
                    f"Adherence prompts of {finding!r} must be {{'stated': [...], 'negated': [...]}}, got {sides!r}."
                )
            entries.append(cls(finding, sides["stated"], sides["negated"]))
        if not entries:
            raise ValueError("No adherence prompts given: name at least one finding.")
        return entries


class ConditionAdherence:
    """Per-finding adherence AUROC of images generated from stating and negating prompts.

    Every prompt gets ``samples_per_prompt`` images, sample ``i`` of each prompt starting from noise seeded
    ``seed + i``: stated and negated prompts share their starting noise, so the prompt is the only difference.

    Args:
        sampler: the guided sampler of the adherence images (its guidance scale is the one being judged).
        classifier: ``images (N, 1, H, W) in [0, 1] -> probabilities (N, F)``, with a ``findings`` attribute naming
            the ``F`` columns (:class:`common.evaluation.findings.FindingClassifier`).
        prompts: ``{finding: {"stated": [...], "negated": [...]}}``; every finding must be one the classifier scores.
        samples_per_prompt: images per prompt.
        seed: seed of the first sample of each prompt.
        batch_size: images per sampling batch.
        network: the UNet ``sampler`` runs (a guidance-distilled student, say), or ``None`` for the one the caller
            passes.
    """

    def __init__(
        self,
        sampler: GuidedLatentSampler,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        prompts: Mapping[str, Mapping[str, Sequence[str]]],
        samples_per_prompt: int = 10,
        seed: int = 0,
        batch_size: int = 16,
        network: torch.nn.Module | None = None,
    ) -> None:
        if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be an integer >= 1, got {samples_per_prompt!r}.")
        self.sampler = sampler
        self.classifier = classifier
        self.findings = tuple(classifier.findings)
        self.prompts = FindingPrompts.from_mapping(prompts)
        if unknown := sorted(p.finding for p in self.prompts if p.finding not in self.findings):
            raise ValueError(f"The finding classifier does not score {unknown}; it scores {list(self.findings)}.")
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.network = network

    @property
    def num_images(self) -> int:
        """Images generated in all."""
        return self.samples_per_prompt * sum(len(p.stated) + len(p.negated) for p in self.prompts)

    def __call__(
        self,
        network: torch.nn.Module,
        prompt_encoder: Callable[[Sequence[str]], torch.Tensor],
        latent_shape: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> dict[str, Any]:
        """Generate, score and return ``{"auroc": {finding: AUROC}, "mean_auroc": ..., "per_prompt": {...}}``.

        ``per_prompt`` holds the mean probability of the finding over the images of each prompt, which shows
        which wording the model follows and which it ignores.
        """
        network = network if self.network is None else self.network
        aurocs: dict[str, float | None] = {}
        per_prompt: dict[str, dict[str, float]] = {}
        for entry in self.prompts:
            column = self.findings.index(entry.finding)
            scores, truth = [], []
            per_prompt[entry.finding] = {}
            for stated, prompts in ((1.0, entry.stated), (0.0, entry.negated)):
                for prompt in prompts:
                    images = generate_images(
                        self.sampler,
                        network,
                        prompt_encoder,
                        latent_shape,
                        self.samples_per_prompt,
                        self.seed,
                        prompt=prompt,
                        batch_size=self.batch_size,
                        device=device,
                    )
                    probability = self.classifier(images)[:, column].float().cpu()
                    per_prompt[entry.finding][prompt] = round(float(probability.mean()), 4)
                    scores.append(probability)
                    truth.append(torch.full_like(probability, stated))
            auroc = finding_auroc(torch.cat(scores)[:, None], torch.cat(truth)[:, None], [entry.finding])
            aurocs[entry.finding] = None if auroc[entry.finding] is None else round(auroc[entry.finding], 4)
            logger.info("Condition adherence of %s: AUROC %s", entry.finding, aurocs[entry.finding])
        defined = [v for v in aurocs.values() if v is not None]
        return {
            "auroc": aurocs,
            "mean_auroc": round(sum(defined) / len(defined), 4) if defined else None,
            "per_prompt": per_prompt,
            "samples_per_prompt": self.samples_per_prompt,
            "guidance_scale": self.sampler.guidance_scale,
            "guidance_interval": _as_list(getattr(self.sampler, "guidance_interval", None)),
            "distilled_guidance": getattr(self.sampler, "distilled_guidance", None),
            "num_inference_steps": self.sampler.num_inference_steps,
            "scheduler": self.sampler.scheduler_name,
        }


def _as_list(interval: Sequence[float] | None) -> list[float] | None:
    return None if interval is None else list(interval)
