"""Evaluation of a generative bundle: reconstruction fidelity, sample diversity and FID."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines import SupervisedEvaluator

from common.diffusion.sampling import GuidedLatentSampler
from common.evaluation.publishing import BundleDocs, weights_note
from common.metrics.fid import frechet_distance
from common.metrics.ms_ssim import pairwise_ms_ssim
from common.networks.text_encoder import CLIPPromptEncoder

if TYPE_CHECKING:  # adherence and captioned import generate_images from here
    from common.evaluation.adherence import ConditionAdherence
    from common.evaluation.captioned import CaptionedGeneration

logger = logging.getLogger(__name__)


def collect_images(batches: Iterable[Mapping[str, Any]], key: str = "image") -> torch.Tensor:
    """Concatenate ``batch[key]`` over a data loader: ``(N, C, H, W)`` on the CPU."""
    images = [torch.as_tensor(batch[key]).float().cpu() for batch in batches]
    if not images:
        raise ValueError("The evaluation data loader yielded no batch.")
    return torch.cat(images)


@torch.no_grad()
def generate_images(
    sampler: GuidedLatentSampler,
    network: torch.nn.Module,
    prompt_encoder: CLIPPromptEncoder,
    latent_shape: Sequence[int],
    num_samples: int,
    seed: int,
    prompt: str | Sequence[str] = "",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``num_samples`` images ``(N, C, H, W)`` in [0, 1]; sample ``i`` starts from noise seeded ``seed + i``.

    ``prompt`` is one prompt for every sample, or one per sample (``num_samples`` of them).
    """
    prompts = [prompt] * num_samples if isinstance(prompt, str) else list(prompt)
    if len(prompts) != num_samples:
        raise ValueError(f"{len(prompts)} prompts for {num_samples} samples: give one prompt, or one per sample.")
    images = []
    for start in range(0, num_samples, batch_size):
        seeds = range(seed + start, seed + min(start + batch_size, num_samples))
        noise = torch.stack(
            [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
        context = prompt_encoder(prompts[start : start + len(seeds)]).to(device)
        uncond = prompt_encoder([""] * len(seeds)).to(device)
        images.append(sampler(noise.to(device), network, context=context, uncond_context=uncond).clamp(0, 1).cpu())
    return torch.cat(images)


class LatentDiffusionEvaluation:
    """The article's evaluation of a latent diffusion bundle, written to JSON, metadata and README.

    * reconstruction MS-SSIM of the autoencoder on the test split (``reconstruction_evaluator``);
    * diversity: mean MS-SSIM over pairs of ``num_samples`` unconditional samples, next to the same on
      real test slices (lower = more diverse; a model should match the real value);
    * FID between features of real test slices and of the samples, with MONAI's ``FIDMetric``.

    Args:
        reconstruction_evaluator: ``SupervisedEvaluator`` whose key metric is reconstruction MS-SSIM.
        real_loader: test slices (dicts with ``image``).
        feature_extractor: images ``(N, 1, H, W)`` -> features ``(N, D)`` (see ``common.feature_extractors``).
        feature_extractor_name: how the features were made, recorded beside the FID.
        provenance: what produced the figures (command, weight hashes, demo or not), recorded with them
            (``common.evaluation.publishing.run_provenance``).
        publish_to: where the figures are published when asked (``BundleDocs``); ``None`` only logs them.
        adherence: condition adherence of prompted samples (``common.evaluation.adherence.ConditionAdherence``),
            or ``None`` for a model without findings to adhere to.
        captioned: generation from each test slice's caption with the inference sampler, judged by FID, diversity
            and adherence to each study's facts (``common.evaluation.captioned.CaptionedGeneration``), or ``None``.
        split: the datalist split evaluated, recorded with the results (only ``test`` is published).
    """

    def __init__(
        self,
        reconstruction_evaluator: SupervisedEvaluator,
        sampler: GuidedLatentSampler,
        network: torch.nn.Module,
        prompt_encoder: CLIPPromptEncoder,
        latent_shape: Sequence[int],
        real_loader: Iterable[Mapping[str, Any]],
        feature_extractor: Callable[[torch.Tensor], torch.Tensor],
        feature_extractor_name: str,
        num_samples: int = 100,
        seed: int = 0,
        batch_size: int = 16,
        device: torch.device | str = "cpu",
        provenance: Mapping[str, Any] | None = None,
        publish_to: BundleDocs | None = None,
        adherence: ConditionAdherence | None = None,
        captioned: CaptionedGeneration | None = None,
        split: str = "test",
    ) -> None:
        self.reconstruction_evaluator = reconstruction_evaluator
        self.sampler = sampler
        self.network = network
        self.prompt_encoder = prompt_encoder
        self.latent_shape = tuple(latent_shape)
        self.real_loader = real_loader
        self.feature_extractor = feature_extractor
        self.feature_extractor_name = feature_extractor_name
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.device = device
        self.provenance = dict(provenance or {})
        self.publish_to = publish_to
        self.adherence = adherence
        self.captioned = captioned
        self.split = split

    def run(self) -> dict[str, Any]:
        self.reconstruction_evaluator.run()
        recon_ms_ssim = float(
            self.reconstruction_evaluator.state.metrics[self.reconstruction_evaluator.state.key_metric_name]
        )
        # PSNR of reconstructions (when the evaluator computes it) bounds what any model decoded by it can score.
        recon_psnr = self.reconstruction_evaluator.state.metrics.get("test_reconstruction_psnr")
        real = collect_images(self.real_loader)
        logger.info("Generating %d unconditional samples for diversity and FID", self.num_samples)
        fake = generate_images(
            self.sampler,
            self.network,
            self.prompt_encoder,
            self.latent_shape,
            self.num_samples,
            self.seed,
            batch_size=self.batch_size,
            device=self.device,
        )
        real_div, real_div_std = pairwise_ms_ssim(real, seed=self.seed)
        fake_div, fake_div_std = pairwise_ms_ssim(fake, seed=self.seed)
        real_features = self.feature_extractor(real)
        fid = frechet_distance(real_features, self.feature_extractor(fake))
        metrics = {
            "reconstruction_ms_ssim_test": round(recon_ms_ssim, 4),
            "sample_diversity_ms_ssim": round(fake_div, 4),
            "real_diversity_ms_ssim_test": round(real_div, 4),
            "fid": round(fid, 4),
        }
        if recon_psnr is not None:
            metrics["reconstruction_psnr_test"] = round(float(recon_psnr), 4)
        adherence = None
        if self.adherence is not None:
            logger.info("Generating %d prompted samples for condition adherence", self.adherence.num_images)
            adherence = self.adherence(self.network, self.prompt_encoder, self.latent_shape, self.device)
            for finding, auroc in adherence["auroc"].items():
                metrics[f"adherence_auroc_{finding}"] = auroc
            metrics["adherence_auroc_mean"] = adherence["mean_auroc"]
        captioned = None
        if self.captioned is not None:
            logger.info("Generating %d samples from the %s captions", self.captioned.num_images, self.split)
            captioned = self.captioned(
                self.network,
                self.prompt_encoder,
                self.latent_shape,
                self.device,
                real,
                self.feature_extractor,
                real_features=real_features,
            )
            metrics.update(self.captioned.metrics(captioned))
        results = {
            "metrics": metrics,
            "std": {
                "sample_diversity_ms_ssim": round(fake_div_std, 4),
                "real_diversity_ms_ssim_test": round(real_div_std, 4),
            },
            "split": self.split,
            "num_real_test_images": int(real.shape[0]),
            "num_generated_samples": int(fake.shape[0]),
            "guidance_scale": self.sampler.guidance_scale,
            "num_inference_steps": self.sampler.num_inference_steps,
            "eta": self.sampler.eta,
            "scheduler": self.sampler.scheduler_name,
            "precision": getattr(self.sampler, "precision", "fp32"),
            "fid_features": self.feature_extractor_name,
            "command": self.provenance.get("command", ""),
            "provenance": self.provenance,
        }
        if adherence is not None:
            results["condition_adherence"] = adherence
        if captioned is not None:
            results["captioned_generation"] = captioned
        logger.info("Evaluation on the %s split: %s", self.split, metrics)
        if self.publish_to is not None:
            self.publish_to.publish(results, metrics, results_table(results))
        return results


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown table of evaluation results with the command that produced them."""
    m, s = results["metrics"], results["std"]
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| autoencoder reconstruction MS-SSIM (test, {results['num_real_test_images']} images) | {m['reconstruction_ms_ssim_test']:.4f} |",
        *(
            [f"| autoencoder reconstruction PSNR (test, dB, max 1.0) | {m['reconstruction_psnr_test']:.2f} |"]
            if "reconstruction_psnr_test" in m
            else []
        ),
        f"| sample diversity MS-SSIM ({results['num_generated_samples']} unconditional samples) | "
        f"{m['sample_diversity_ms_ssim']:.4f} ± {s['sample_diversity_ms_ssim']:.4f} |",
        f"| real diversity MS-SSIM (test images) | {m['real_diversity_ms_ssim_test']:.4f} ± {s['real_diversity_ms_ssim_test']:.4f} |",
        f"| FID ({results['fid_features']}) | {m['fid']:.4f} |",
    ]
    sampling = (
        f"Sampling: {results['scheduler'].upper()} {results['num_inference_steps']} steps, "
        f"guidance {results['guidance_scale']} (unconditional), {results.get('precision', 'fp32')}."
    )
    if adherence := results.get("condition_adherence"):
        rows += [
            f"| condition adherence AUROC, {finding.replace('_', ' ')} | {_number(auroc)} |"
            for finding, auroc in adherence["auroc"].items()
        ]
        rows.append(f"| condition adherence AUROC, mean | {_number(adherence['mean_auroc'])} |")
        sampling += (
            f" Condition adherence: {adherence['samples_per_prompt']} samples per prompt that states or negates each "
            f"finding, {adherence['scheduler'].upper()} {adherence['num_inference_steps']} steps, guidance "
            f"{adherence['guidance_scale']}{_distilled_note(adherence)}, scored by the phantom finding classifier."
        )
    if captioned := results.get("captioned_generation"):
        adherence = captioned["condition_adherence"]
        rows += [
            f"| FID, one sample per test caption ({captioned['num_samples']}) | {captioned['fid']:.4f} |",
            f"| sample diversity MS-SSIM, captioned samples | {captioned['diversity_ms_ssim']:.4f} ± "
            f"{captioned['diversity_ms_ssim_std']:.4f} |",
            *(
                f"| {row['measure']} (real test images: {_number(row['real'])}) | {_number(row['generated'])} |"
                for row in adherence["summary"]
            ),
        ]
        interval = captioned["guidance_interval"]
        sampling += (
            f" Captioned samples ({captioned['prompts']}): {captioned['scheduler'].upper()} "
            f"{captioned['num_inference_steps']} steps, guidance {captioned['guidance_scale']}"
            + (
                f" on the {captioned['guided_steps']} steps with noise level in ({interval[0]}, {interval[1]}]"
                if interval
                else ""
            )
            + _distilled_note(captioned)
            + f", {captioned['precision']}, the inference defaults; adherence measured by {adherence['measured_by']}."
        )
    if note := weights_note(results.get("provenance", {})):
        sampling += f"\n\n{note}"
    return "\n".join(rows) + f"\n\n{sampling}\n\nProduced by:\n\n```bash\n{results['command']}\n```\n"


def _distilled_note(settings: Mapping[str, Any]) -> str:
    """Said after the guidance of samples that a guidance-distilled UNet made."""
    return " (guidance-distilled UNet: one call per step)" if settings.get("distilled_guidance") is not None else ""


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
