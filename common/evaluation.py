"""Evaluation of a latent diffusion bundle: reconstruction fidelity, sample diversity and FID, reported once."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedEvaluator

from common.bundle_metadata import update_eval_metrics
from common.io import atomic_path, write_json
from common.metrics import frechet_distance, pairwise_ms_ssim
from common.sampling import GuidedLatentSampler
from common.text.encoder import CLIPPromptEncoder

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
    prompt: str = "",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``num_samples`` images ``(N, C, H, W)`` in [0, 1]; sample ``i`` starts from noise seeded ``seed + i``."""
    images = []
    for start in range(0, num_samples, batch_size):
        seeds = range(seed + start, seed + min(start + batch_size, num_samples))
        noise = torch.stack(
            [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
        context = prompt_encoder([prompt] * len(seeds)).to(device)
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
        results_path, metadata_path, readme_path: where the figures go; ``None`` skips one.
        command: the command that produced the figures, recorded with them.
        publish: ``False`` only logs the figures (a quick run must not overwrite the documented ones).
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
        results_path: str | None = None,
        metadata_path: str | None = None,
        readme_path: str | None = None,
        readme_section: str = "evaluation",
        command: str = "",
        publish: bool = True,
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
        self.results_path = results_path
        self.metadata_path = metadata_path
        self.readme_path = readme_path
        self.readme_section = readme_section
        self.command = command
        self.publish = publish

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
        fid = frechet_distance(self.feature_extractor(real), self.feature_extractor(fake))
        metrics = {
            "reconstruction_ms_ssim_test": round(recon_ms_ssim, 4),
            "sample_diversity_ms_ssim": round(fake_div, 4),
            "real_diversity_ms_ssim_test": round(real_div, 4),
            "fid": round(fid, 4),
        }
        if recon_psnr is not None:
            metrics["reconstruction_psnr_test"] = round(float(recon_psnr), 4)
        results = {
            "metrics": metrics,
            "std": {
                "sample_diversity_ms_ssim": round(fake_div_std, 4),
                "real_diversity_ms_ssim_test": round(real_div_std, 4),
            },
            "num_real_test_images": int(real.shape[0]),
            "num_generated_samples": int(fake.shape[0]),
            "guidance_scale": self.sampler.guidance_scale,
            "num_inference_steps": self.sampler.num_inference_steps,
            "eta": self.sampler.eta,
            "scheduler": self.sampler.scheduler_name,
            "fid_features": self.feature_extractor_name,
            "command": self.command,
        }
        logger.info("Evaluation: %s", metrics)
        if not self.publish:
            logger.info("Not publishing (quick run): results, metadata and README left as they are.")
            return results
        if self.results_path:
            write_json(self.results_path, results)
        if self.metadata_path:
            update_eval_metrics(self.metadata_path, metrics)
        if self.readme_path:
            update_readme_section(self.readme_path, self.readme_section, results_table(results))
        return results


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown table of evaluation results with the command that produced them."""
    m, s = results["metrics"], results["std"]
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| autoencoder reconstruction MS-SSIM (test, {results['num_real_test_images']} slices) | {m['reconstruction_ms_ssim_test']:.4f} |",
        *(
            [f"| autoencoder reconstruction PSNR (test, dB, max 1.0) | {m['reconstruction_psnr_test']:.2f} |"]
            if "reconstruction_psnr_test" in m
            else []
        ),
        f"| sample diversity MS-SSIM ({results['num_generated_samples']} unconditional samples) | "
        f"{m['sample_diversity_ms_ssim']:.4f} ± {s['sample_diversity_ms_ssim']:.4f} |",
        f"| real diversity MS-SSIM (test slices) | {m['real_diversity_ms_ssim_test']:.4f} ± {s['real_diversity_ms_ssim_test']:.4f} |",
        f"| FID ({results['fid_features']}) | {m['fid']:.4f} |",
    ]
    sampling = (
        f"Sampling: {results['scheduler'].upper()} {results['num_inference_steps']} steps, "
        f"guidance {results['guidance_scale']} (unconditional)."
    )
    return "\n".join(rows) + f"\n\n{sampling}\n\nProduced by:\n\n```bash\n{results['command']}\n```\n"


def update_readme_section(readme_path: str, section: str, body: str) -> None:
    """Replace the text between ``<!-- {section}:start -->`` and ``<!-- {section}:end -->`` in a README."""
    path = Path(readme_path)
    text = path.read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no '{start}' ... '{end}' markers for the results.")
    new = pattern.sub(lambda _: f"{start}\n{body}{end}", text)
    with atomic_path(path) as tmp:
        tmp.write_text(new)
