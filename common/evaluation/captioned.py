"""Generation from the test captions, with the sampler users sample with: realism and condition adherence.

The unconditional figures (FID and diversity at guidance 0) say whether the model learned the image distribution;
they say nothing about the guided sampling a user runs. Here every real test slice gets one generated slice from its
own caption, sampled with the inference settings (guidance scale and interval, steps, precision), and the generated
set is judged against the real test slices (FID, diversity) and against the caption facts (the brain measures'
ventricle and tissue adherence, next to the same scores of the real slices, which bound them).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from common.diffusion.sampling import GuidedLatentSampler
from common.evaluation.brain_measures import adherence_scores, measure_slices
from common.evaluation.generation import generate_images
from common.metrics.fid import frechet_distance
from common.metrics.ms_ssim import pairwise_ms_ssim
from common.networks.text_encoder import CLIPPromptEncoder

logger = logging.getLogger(__name__)


class CaptionedGeneration:
    """One generated slice per test slice, from the slice's caption (sample ``i`` from noise seeded ``seed + i``).

    Args:
        sampler: the guided sampler being judged (the inference defaults: guidance, interval, steps, precision).
        entries: the test datalist entries, in the order of the real images; each has ``caption`` and the
            phantom facts (``ventricle_volume_ml``, tissue fractions) that :func:`adherence_scores` reads.
        seed: seed of the first sample.
        batch_size: images per sampling batch.
        spacing_mm: in-plane pixel spacing of the slices, for the brain measures.
        network: the UNet ``sampler`` runs (a guidance-distilled student, say), or ``None`` for the one the
            caller passes.
    """

    def __init__(
        self,
        sampler: GuidedLatentSampler,
        entries: Sequence[Mapping[str, Any]],
        seed: int = 0,
        batch_size: int = 16,
        spacing_mm: float | Sequence[float] = 2.0,
        network: torch.nn.Module | None = None,
    ) -> None:
        missing = [i for i, entry in enumerate(entries) if not str(entry.get("caption", "")).strip()]
        if missing:
            raise ValueError(
                f"{len(missing)} test entries have no caption (first: index {missing[0]}): captioned generation needs "
                "the datalist's `caption` of every entry (make-brain-phantoms writes them)."
            )
        self.sampler = sampler
        self.entries = list(entries)
        self.seed = seed
        self.batch_size = batch_size
        self.spacing_mm = spacing_mm
        self.network = network

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
            prompt=[entry["caption"] for entry in self.entries],
            batch_size=self.batch_size,
            device=device,
        )
        diversity, diversity_std = pairwise_ms_ssim(fake, seed=self.seed)
        with warnings.catch_warnings():  # a constant requested fact (few test subjects) warns; None is reported
            warnings.simplefilter("ignore")
            generated = adherence_scores(self.entries, measure_slices(fake[:, 0].numpy(), self.spacing_mm))
            ceiling = adherence_scores(self.entries, measure_slices(real[:, 0].numpy(), self.spacing_mm))
        sampler = self.sampler
        return {
            "num_samples": int(fake.shape[0]),
            "prompts": "the caption of each test slice, one sample each",
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
            "condition_adherence": {"generated": generated, "real_test_slices": ceiling},
        }

    @staticmethod
    def metrics(result: Mapping[str, Any]) -> dict[str, float]:
        """The headline figures of a result of this class, flat and rounded (``None`` ones left out)."""
        generated = result["condition_adherence"]["generated"]
        values = {
            "captioned_fid": result["fid"],
            "captioned_diversity_ms_ssim": result["diversity_ms_ssim"],
            "ventricle_adherence_pearson_r": generated["ventricle"]["pearson_r"],
            "ventricle_size_word_accuracy": generated["ventricle"]["size_word_accuracy"],
            "csf_fraction_pearson_r": generated["csf_fraction"]["pearson_r"],
            "gm_fraction_pearson_r": generated["gm_fraction"]["pearson_r"],
            "wm_fraction_pearson_r": generated["wm_fraction"]["pearson_r"],
        }
        return {name: round(float(value), 4) for name, value in values.items() if value is not None}
