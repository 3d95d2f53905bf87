"""Evaluation of an unCLIP bundle on a test split: one image per test caption, judged four ways plus memorisation.

For every test slice, its canonical caption (:func:`~common.data.brain.captions.canonical_caption` of its facts)
goes through the whole chain (prior, decoder) with seed ``seed + i``; the generated slices are compared with the
real test slices:

* **gray levels** inside the brain mask (:func:`~common.metrics.intensity.compare_intensities`): histogram
  intersection, Jensen-Shannon divergence, Wasserstein-1, KS statistic, per-tissue means;
* **texture**: GLCM features (scikit-image) compared as distributions (:func:`~common.metrics.texture.compare_texture`);
* **CLIP latent space**: Frechet distance and MMD (MONAI ``FIDMetric`` / ``MMDMetric``) of CLIP image embeddings,
  k-NN precision and recall, CLIP score of each image against its caption, and text-to-image Recall@K of the
  generated images, next to the fine-tuned CLIP's own Recall@K on the real slices and chance;
* **condition adherence**: requested facts against those measured on the generated slices by the phantoms'
  ground-truth measurement (:mod:`common.evaluation.brain_measures`), next to the same on the real slices (the
  measurement's ceiling);
* **memorisation**: each sample's nearest training slice in CLIP space, against real test slices'.

Gray levels and texture are also given for the autoencoder's reconstructions of the real test slices: what the
latent space itself loses. Samples can differ from them either way: decoding sampled latents can restore texture
that the reconstructions (posterior means) smooth away.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.metrics import MMDMetric

from common.data.brain.captions import canonical_caption
from common.diffusion.unclip import UnclipPipeline
from common.evaluation.brain_measures import adherence_scores, measure_slices
from common.evaluation.publishing import BundleDocs, weights_note
from common.metrics.fid import frechet_distance
from common.metrics.intensity import compare_intensities
from common.metrics.manifold import precision_recall
from common.metrics.memorisation import memorisation_report
from common.metrics.retrieval import chance_recall_at_k, clip_score, retrieval_recall_at_k
from common.metrics.texture import compare_texture, glcm_feature_names, glcm_features

logger = logging.getLogger(__name__)

#: Recall@K cut-offs reported.
RECALL_KS = (1, 5)


def load_images(items: Sequence[Mapping[str, Any]], load: Callable[[dict], Mapping[str, Any]]) -> torch.Tensor:
    """``(N, 1, H, W)`` float32 slices of datalist ``items``, each read by ``load`` (a dict transform)."""
    if not items:
        raise ValueError("No items to load: the split is empty.")
    return torch.stack([torch.as_tensor(load(dict(item))["image"]).float() for item in items])


def _round(value: Any, ndigits: int = 4) -> Any:
    return None if value is None else round(float(value), ndigits)


class UnclipEvaluation:
    """Generate one slice per test caption through ``pipeline`` and score it (see the module docstring).

    Args:
        pipeline: the CLIP, prior and decoder (its CLIP is the fine-tuned one Recall@K and the embeddings use).
        test_items: the test split, each with ``"image"`` and ``"facts"`` (``with_caption_facts``).
        train_items: the training split (memorisation reference).
        load: reads an item's ``"image"`` to ``(1, H, W)`` in [0, 1].
        seed: sample ``i`` uses seed ``seed + i``.
        batch_size: captions per generation batch.
        prior_guidance_scale, decoder_guidance_scale: guidance for the evaluation (``None``: the samplers').
        spacing_mm: pixel spacing, for the brain measurements.
        provenance: what produced the figures (``run_provenance``), recorded with them.
        publish_to: where the figures are published when asked; ``None`` only logs them.
        split: the datalist split evaluated, recorded with the results (only ``test`` is published).
    """

    def __init__(
        self,
        pipeline: UnclipPipeline,
        test_items: Sequence[Mapping[str, Any]],
        train_items: Sequence[Mapping[str, Any]],
        load: Callable[[dict], Mapping[str, Any]],
        seed: int = 0,
        batch_size: int = 25,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
        spacing_mm: float = 2.0,
        provenance: Mapping[str, Any] | None = None,
        publish_to: BundleDocs | None = None,
        split: str = "test",
    ) -> None:
        if missing := [i for i, item in enumerate(test_items) if "facts" not in item]:
            raise ValueError(
                f"Test items {missing[:5]} have no 'facts': build the split with "
                "common.data.brain.captions.with_caption_facts."
            )
        self.pipeline = pipeline
        self.test_items = list(test_items)
        self.split = split
        self.train_items = list(train_items)
        self.load = load
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.prior_guidance_scale = prior_guidance_scale
        self.decoder_guidance_scale = decoder_guidance_scale
        self.spacing_mm = float(spacing_mm)
        self.provenance = dict(provenance or {})
        self.publish_to = publish_to

    def generate(self, captions: Sequence[str]) -> torch.Tensor:
        """One slice per caption ``(N, 1, H, W)`` on the CPU, caption ``i`` with seed ``seed + i``."""
        images = []
        for start in range(0, len(captions), self.batch_size):
            batch = list(captions[start : start + self.batch_size])
            seeds = [self.seed + start + i for i in range(len(batch))]
            images.append(
                self.pipeline.text_to_image(batch, seeds, self.prior_guidance_scale, self.decoder_guidance_scale).cpu()
            )
            logger.info("Generated %d / %d %s captions", start + len(batch), len(captions), self.split)
        return torch.cat(images)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's reconstructions ``(N, 1, H, W)`` in [0, 1] of ``images`` (posterior means)."""
        latent_space = self.pipeline.decoder_sampler.latent_space
        parts = []
        for i in range(0, images.shape[0], self.batch_size):
            z_mu, _ = latent_space.moments(images[i : i + self.batch_size].to(self.pipeline.device))
            parts.append(latent_space.autoencoder.decode(z_mu).clamp(0, 1).cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        clip = self.pipeline.clip.eval()
        return torch.cat(
            [
                clip.encode_images(images[i : i + self.batch_size].to(self.pipeline.device)).cpu()
                for i in range(0, images.shape[0], self.batch_size)
            ]
        )

    @torch.no_grad()
    def _embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        clip = self.pipeline.clip.eval()
        return torch.cat(
            [
                clip.encode_texts(list(captions[i : i + self.batch_size])).cpu()
                for i in range(0, len(captions), self.batch_size)
            ]
        )

    def latent_space(
        self, real: torch.Tensor, fake: torch.Tensor, captions: Sequence[str]
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """CLIP-embedding figures of generated slices ``fake`` against ``real`` test slices and their captions, with
        the real and generated image embeddings ``(N, D)``."""
        real_emb, fake_emb, text_emb = self._embed_images(real), self._embed_images(fake), self._embed_texts(captions)
        result: dict[str, Any] = {
            "frechet_distance": frechet_distance(real_emb, fake_emb),
            "mmd": float(MMDMetric()(real_emb.double(), fake_emb.double())),  # one sample per real slice
            **precision_recall(real_emb, fake_emb),
            "clip_score_generated": clip_score(fake_emb, text_emb),
            "clip_score_real": clip_score(real_emb, text_emb),
            "recall_generated": retrieval_recall_at_k(fake_emb, text_emb, RECALL_KS, captions),
            "recall_real": retrieval_recall_at_k(real_emb, text_emb, RECALL_KS, captions),
            "recall_chance": {f"R@{k}": chance_recall_at_k(len(captions), k, captions) for k in RECALL_KS},
        }
        return result, real_emb, fake_emb

    def run(self) -> dict[str, Any]:
        real = load_images(self.test_items, self.load)
        captions = [canonical_caption(item["facts"]) for item in self.test_items]
        logger.info("Generating one slice for each of the %d %s captions", len(captions), self.split)
        fake = self.generate(captions)
        reconstructed = self.reconstruct(real)
        intensity = compare_intensities(real.numpy(), fake.numpy(), seed=self.seed)
        reference_intensity = compare_intensities(real.numpy(), reconstructed.numpy(), seed=self.seed)
        real_glcm = glcm_features(real.numpy())
        texture = compare_texture(real_glcm, glcm_features(fake.numpy()), glcm_feature_names())
        reference_texture = compare_texture(real_glcm, glcm_features(reconstructed.numpy()), glcm_feature_names())
        latent, real_emb, fake_emb = self.latent_space(real, fake, captions)
        train_emb = self._embed_images(load_images(self.train_items, self.load))
        memorisation = memorisation_report(fake_emb, train_emb, real_emb)
        with warnings.catch_warnings():  # a constant requested fact (one test subject) warns; None is reported
            warnings.simplefilter("ignore")
            adherence = adherence_scores(self.test_items, measure_slices(fake[:, 0].numpy(), self.spacing_mm))
            ceiling = adherence_scores(self.test_items, measure_slices(real[:, 0].numpy(), self.spacing_mm))
        metrics = self.metrics(intensity, texture, latent, adherence, memorisation)
        results = {
            "metrics": metrics,
            "gray_levels": intensity,
            "texture": texture,
            "autoencoder_reconstruction": {"gray_levels": reference_intensity, "texture": reference_texture},
            "clip_latent_space": latent,
            "condition_adherence": {"generated": adherence, "real_test_slices": ceiling},
            "memorisation": memorisation,
            "split": self.split,
            "num_real_test_images": int(real.shape[0]),
            "num_generated_samples": int(fake.shape[0]),
            "prompts": "the canonical caption of each test slice, one sample each",
            "prior_guidance_scale": self.pipeline.prior_sampler.guidance_scale
            if self.prior_guidance_scale is None
            else self.prior_guidance_scale,
            "decoder_guidance_scale": self.pipeline.decoder_sampler.guidance_scale
            if self.decoder_guidance_scale is None
            else self.decoder_guidance_scale,
            "prior_num_inference_steps": self.pipeline.prior_sampler.num_inference_steps,
            "num_inference_steps": self.pipeline.decoder_sampler.num_inference_steps,
            "scheduler": self.pipeline.decoder_sampler.scheduler_name,
            "decoder_precision": self.pipeline.decoder_sampler.precision,
            "command": self.provenance.get("command", ""),
            "provenance": self.provenance,
        }
        logger.info("Evaluation on the %s split: %s", self.split, metrics)
        if self.publish_to is not None:
            self.publish_to.publish(results, metrics, results_table(results))
        return results

    @staticmethod
    def metrics(
        intensity: Mapping[str, Any],
        texture: Mapping[str, Any],
        latent: Mapping[str, Any],
        adherence: Mapping[str, Any],
        memorisation: Mapping[str, Any],
    ) -> dict[str, float]:
        """The headline figures, flat (``eval_metrics`` of the metadata)."""
        metrics = {
            "histogram_intersection": intensity["histogram_intersection"],
            "jensen_shannon_divergence": intensity["jensen_shannon_divergence"],
            "wasserstein_1": intensity["wasserstein_1"],
            "ks_statistic": intensity["ks_statistic"],
            "glcm_frechet_distance": texture["frechet_distance"],
            "clip_frechet_distance": latent["frechet_distance"],
            "clip_mmd": latent["mmd"],
            "clip_precision": latent["precision"],
            "clip_recall": latent["recall"],
            "clip_score": latent["clip_score_generated"],
            **{
                f"generated_text_to_image_recall_at_{k}": latent["recall_generated"][f"text_to_image_R@{k}"]
                for k in RECALL_KS
            },
            **{f"clip_text_to_image_recall_at_{k}": latent["recall_real"][f"text_to_image_R@{k}"] for k in RECALL_KS},
            **{f"chance_recall_at_{k}": latent["recall_chance"][f"R@{k}"] for k in RECALL_KS},
            "ventricle_adherence_pearson_r": adherence["ventricle"]["pearson_r"],
            "ventricle_size_word_accuracy": adherence["ventricle"]["size_word_accuracy"],
            "csf_fraction_pearson_r": adherence["csf_fraction"]["pearson_r"],
            "gm_fraction_pearson_r": adherence["gm_fraction"]["pearson_r"],
            "wm_fraction_pearson_r": adherence["wm_fraction"]["pearson_r"],
            "memorisation_fraction_above_test_p95": memorisation["fraction_above_test_p95"],
        }
        return {name: _round(value) for name, value in metrics.items() if value is not None}


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown table of the evaluation with the command that produced it."""
    m = results["metrics"]
    real = results["condition_adherence"]["real_test_slices"]
    generated = results["condition_adherence"]["generated"]
    latent = results["clip_latent_space"]
    recon = results["autoencoder_reconstruction"]
    gray = recon["gray_levels"]
    n = results["num_real_test_images"]

    def cell(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    def row(family: str, metric: str, value: str, reference: str = "") -> str:
        return f"| {family} | {metric} | {value} | {reference} |"

    def tissue_row(name: str, key: str) -> str:
        return row(
            "",
            f"{name} fraction: Pearson r / MAE",
            f"{cell(generated[key]['pearson_r'])} / {cell(generated[key]['mae'])}",
            f"real slices: {cell(real[key]['pearson_r'])} / {cell(real[key]['mae'])}",
        )

    rows = [
        "| family | metric | generated | reference |",
        "|---|---|---|---|",
        row(
            "gray levels (in brain mask)",
            "histogram intersection (1 = same)",
            cell(m["histogram_intersection"]),
            f"reconstructions: {cell(gray['histogram_intersection'])}",
        ),
        row(
            "",
            "Jensen-Shannon divergence (0 = same)",
            cell(m["jensen_shannon_divergence"]),
            f"reconstructions: {cell(gray['jensen_shannon_divergence'])}",
        ),
        row("", "Wasserstein-1", cell(m["wasserstein_1"]), f"reconstructions: {cell(gray['wasserstein_1'])}"),
        row("", "KS statistic", cell(m["ks_statistic"]), f"reconstructions: {cell(gray['ks_statistic'])}"),
        *(
            row(
                "",
                f"{name} mean intensity (real {t['mean_real']:.3f})",
                f"{t['mean_fake']:.3f}",
                f"reconstructions: {gray['tissues'][name]['mean_fake']:.3f}",
            )
            for name, t in results["gray_levels"]["tissues"].items()
        ),
        row(
            "texture",
            "GLCM features: Frechet distance (standardised)",
            cell(m["glcm_frechet_distance"]),
            f"reconstructions: {cell(recon['texture']['frechet_distance'])}",
        ),
        row("CLIP latent space", "Frechet distance of image embeddings", cell(m["clip_frechet_distance"])),
        row("", "MMD of image embeddings", cell(m["clip_mmd"])),
        row("", "precision / recall (k = 3)", f"{cell(m['clip_precision'])} / {cell(m['clip_recall'])}"),
        row("", "CLIP score", cell(m["clip_score"]), f"real slices: {cell(latent['clip_score_real'])}"),
        *(
            row(
                "",
                f"text-to-image Recall@{k}",
                cell(m[f"generated_text_to_image_recall_at_{k}"]),
                f"real slices: {cell(m[f'clip_text_to_image_recall_at_{k}'])}; chance: "
                f"{cell(m[f'chance_recall_at_{k}'])}",
            )
            for k in RECALL_KS
        ),
        row(
            "condition adherence",
            "ventricles: Pearson r, requested volume vs measured area",
            cell(generated["ventricle"]["pearson_r"]),
            f"real slices: {cell(real['ventricle']['pearson_r'])}",
        ),
        row(
            "",
            "ventricles: size word accuracy",
            cell(generated["ventricle"]["size_word_accuracy"]),
            f"real slices: {cell(real['ventricle']['size_word_accuracy'])}",
        ),
        tissue_row("CSF", "csf_fraction"),
        tissue_row("grey matter", "gm_fraction"),
        tissue_row("white matter", "wm_fraction"),
        row(
            "memorisation",
            "samples nearer a training slice than 95% of test slices are",
            cell(m["memorisation_fraction_above_test_p95"]),
            "no memorisation: about 0.05",
        ),
    ]
    sampling = (
        f"One sample per test caption ({n} test slices, canonical captions), prior guidance "
        f"{results['prior_guidance_scale']} ({results['prior_num_inference_steps']} steps), decoder guidance "
        f"{results['decoder_guidance_scale']} ({results['scheduler'].upper()} {results['num_inference_steps']} steps, "
        f"{results.get('decoder_precision', 'fp32')})."
        " Recall@K ranks the images for each caption with the fine-tuned CLIP (captions that repeat count as "
        "relevant to each other's images). Reconstructions: the autoencoder's reconstructions of the real test "
        "slices against the real slices, what the latent space itself loses (sampled latents can restore texture "
        "that these posterior-mean reconstructions smooth away). Real slices: the same figure on the real test "
        "slices (for adherence, the measurement's own accuracy). Intensity classes: multi-Otsu classes of the real "
        "slices, darkest first."
    )
    if note := weights_note(results.get("provenance", {})):
        sampling += f"\n\n{note}"
    return "\n".join(rows) + f"\n\n{sampling}\n\nProduced by:\n\n```bash\n{results['command']}\n```\n"
