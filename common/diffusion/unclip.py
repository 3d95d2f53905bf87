"""unCLIP: the decoder's training batches, spherical interpolation, and the prompt -> prior -> decoder pipeline.

The decoder (:class:`common.networks.embedding_context.EmbeddingConditionedUNet`) is a latent diffusion UNet whose
cross-attention context is a CLIP image embedding. It trains in MONAI's ``SupervisedTrainer`` with
``DiffusionInferer`` on :class:`ImageEmbeddingPrepareBatch` batches, where 10% of the embeddings are dropped to the
null embedding (an all-zero row, which the decoder swaps for its learned ``null_embedding``). Sampling uses the
project's ``GuidedLatentSampler`` as is, with ``context`` the image embeddings and ``uncond_context`` zeros.

:class:`UnclipPipeline` chains caption -> CLIP text embedding (and tokens) -> guided prior -> image embedding ->
guided decoder -> image, and offers image variations and prompt interpolation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from common.diffusion.latent_space import ScaledLatentSpace
from common.diffusion.prior_sampling import PriorSampler, caption_condition
from common.diffusion.requests import check_prompt
from common.diffusion.sampling import GuidedLatentSampler, latent_shape
from common.engines.prepare_batch import LatentDiffusionPrepareBatch
from common.networks.clip_model import ClipEncoder
from common.networks.embedding_context import null_context
from common.networks.prior import DiffusionPrior

__all__ = ["SEED_STREAMS", "ImageEmbeddingPrepareBatch", "UnclipPipeline", "seed_streams", "slerp"]


# --- decoder training ----------------------------------------------------------------------------------------------


class ImageEmbeddingPrepareBatch(LatentDiffusionPrepareBatch):
    """Batch dict -> noised-latent training example for the unCLIP decoder, conditioned on CLIP image embeddings.

    The latents are :class:`LatentDiffusionPrepareBatch`'s (drawn from cached ``z_mu``/``z_sigma`` when the batch
    has them, else encoded from ``batch[image_key]``), and so are noise, timesteps and the target (the scheduler's
    ``prediction_type``, v-prediction for the decoder). The condition is ``batch[embedding_key]`` ``(B, D_emb)``,
    precomputed with ``ClipEncoder.encode_images``; each embedding is dropped with probability ``drop_prob``
    (torch's global RNG, seeded like the rest of training) by setting it to zeros, which the decoder replaces by
    its learned null embedding. That teaches the unconditional branch classifier-free guidance samples with.

    Returns ``(latents, target, (), {"noise", "timesteps", "condition"})`` for ``DiffusionInferer``, with
    ``condition`` ``(B, D_emb)`` float32.

    Args:
        latent_space: the frozen autoencoder and its scale factor.
        scheduler: the training scheduler (``SchedulerSettings.build``).
        drop_prob: probability of dropping an embedding to the null embedding.
        image_key: batch key of the images (used only when the batch has no cached moments).
        embedding_key: batch key of the CLIP image embeddings ``(B, D_emb)`` (or ``(B, 1, D_emb)``).
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        scheduler: torch.nn.Module,
        drop_prob: float = 0.1,
        image_key: str = "image",
        embedding_key: str = "image_embedding",
    ) -> None:
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"`drop_prob` must be in [0, 1], got {drop_prob}.")
        # no prompt encoder: the condition is the image embedding
        super().__init__(latent_space, None, scheduler, image_key=image_key, prompt_key=embedding_key)  # type: ignore[arg-type]
        self.drop_prob = float(drop_prob)
        self.embedding_key = embedding_key

    def embeddings(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        """The batch's image embeddings ``(B, D_emb)`` (float32, plain tensor), with ``drop_prob`` of them zeroed."""
        if self.embedding_key not in batchdata:
            raise KeyError(
                f"The batch has no '{self.embedding_key}': the decoder trains on precomputed CLIP image embeddings "
                "(ClipEncoder.encode_images of each slice) stored under that key."
            )
        embedding = batchdata[self.embedding_key]
        if isinstance(embedding, MetaTensor):
            embedding = embedding.as_tensor()
        embedding = torch.as_tensor(embedding).to(device=device, non_blocking=non_blocking, **kwargs).float()
        if embedding.ndim == 3 and embedding.shape[1] == 1:
            embedding = embedding[:, 0]
        if embedding.ndim != 2:
            raise ValueError(f"Expected image embeddings of shape (B, D_emb), got {tuple(embedding.shape)}.")
        drop = torch.rand(embedding.shape[0], device=embedding.device) < self.drop_prob
        return torch.where(drop[:, None], null_context(embedding), embedding)

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        latents = self.latents(batchdata, device, non_blocking, **kwargs)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        target = self.get_target(latents, noise, timesteps)
        condition = self.embeddings(batchdata, device, non_blocking, **kwargs)
        if condition.shape[0] != latents.shape[0]:
            raise ValueError(f"{condition.shape[0]} image embeddings for {latents.shape[0]} images in the batch.")
        return latents, target, (), {"noise": noise, "timesteps": timesteps, "condition": condition}


# --- interpolation -------------------------------------------------------------------------------------------------


def slerp(start: torch.Tensor, end: torch.Tensor, weights: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``start`` to ``end`` (each ``(D,)``) at ``weights`` in [0, 1].

    ``sin((1 - w) a) / sin(a) * start + sin(w a) / sin(a) * end``, ``a`` the angle between the two directions: for
    unit vectors, the great-circle path at constant speed (every point unit-norm), which a linear blend of CLIP
    embeddings is not. Weight 0 returns ``start`` and weight 1 ``end`` exactly. Nearly parallel vectors fall back to
    linear interpolation; opposite ones have no unique path and are refused.

    Returns:
        ``(D,)`` for a number ``weights``, else ``(N, D)`` for ``N`` weights.
    """
    if start.ndim != 1 or start.shape != end.shape:
        raise ValueError(f"slerp takes two vectors of the same size, got {tuple(start.shape)} and {tuple(end.shape)}.")
    scalar = isinstance(weights, int | float)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1, 1).to(start.device)
    if ((w < 0) | (w > 1)).any():
        raise ValueError(f"slerp weights must be in [0, 1], got {w.flatten().tolist()}.")
    a, b = start.double(), end.double()
    cos = (F.normalize(a, dim=0) * F.normalize(b, dim=0)).sum().clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    if sin < 1e-6:
        if cos < 0:
            raise ValueError("slerp between opposite vectors is undefined (no unique great circle).")
        out = (1 - w) * a + w * b
    else:
        out = torch.sin((1 - w) * angle) / sin * a + torch.sin(w * angle) / sin * b
    out = torch.where(w == 0, a, torch.where(w == 1, b, out)).to(start.dtype)
    return out[0] if scalar else out


# --- the pipeline --------------------------------------------------------------------------------------------------

#: The random streams of one sample, each seeded from the sample's seed (:func:`seed_streams`).
SEED_STREAMS = ("prior_noise", "prior_steps", "decoder_noise", "decoder_steps")


def seed_streams(seed: int) -> dict[str, int]:
    """Seeds of a sample's four random streams (:data:`SEED_STREAMS`), derived from ``seed`` by numpy's ``SeedSequence``.

    The prior's starting noise, the prior's step noise (DDIM ``eta > 0`` or DDPM), the decoder's starting noise and
    its step noise are then independent of one another yet a function of ``seed`` alone (not of the batch).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"Seeds must be non-negative integers, got {seed!r}.")
    words = np.random.SeedSequence(int(seed)).generate_state(len(SEED_STREAMS), np.uint64)
    return {name: int(word) for name, word in zip(SEED_STREAMS, words, strict=True)}


def _with_guidance(sampler: GuidedLatentSampler, scale: float | None) -> GuidedLatentSampler:
    """``sampler``, or a shallow copy of it with guidance ``scale`` (the shared sampler is left untouched)."""
    if scale is None:
        return sampler
    if not scale >= 0:
        raise ValueError(f"Guidance scales must be >= 0 (0: unconditional, 1: conditional), got {scale}.")
    return sampler.replaced(guidance_scale=float(scale))


class UnclipPipeline:
    """Text-to-image, image variations and prompt interpolation with an unCLIP prior and decoder.

    * :meth:`image_embedding_of`: prompts -> CLIP text embeddings (and token states) -> guided prior -> image
      embeddings (unit-normalised by default, as the decoder was trained on ``ClipEncoder.encode_images``);
    * :meth:`decode`: image embeddings -> guided decoder -> images in [0, 1]; the unconditional branch is the
      decoder's null embedding (``uncond_context`` zeros), as in training;
    * :meth:`text_to_image` = both; :meth:`variations` decodes the CLIP embedding of given slices;
      :meth:`interpolate` decodes :func:`slerp` steps between two prompts' image embeddings.

    Every sample is a function of its seed alone (:func:`seed_streams`): its prior noise and its decoder noise are
    drawn on the CPU from generators seeded by the seed's streams, and stochastic schedulers take per-sample
    generators too. Guidance scales given to a method override the samplers' for that call; ``None`` keeps them.

    Args:
        clip: the CLIP encoder the prior and the decoder's embeddings come from.
        prior: the fitted :class:`DiffusionPrior`.
        prior_sampler: its :class:`PriorSampler` (steps, scheduler, default guidance).
        decoder: the :class:`EmbeddingConditionedUNet`.
        decoder_sampler: its :class:`GuidedLatentSampler` (latent space, steps, scheduler, default guidance).
        image_size: ``(H, W)`` of the generated slices (multiples of the autoencoder's downsampling factor).
        use_text_tokens: give the prior the captions' token states (as ``PriorPrepareBatch`` does by default).
        use_text_mask: give the prior the token mask too (only if it was trained with one).
        normalize_embeddings: unit-normalise the prior's embeddings before decoding.
        device: where the networks run.
    """

    def __init__(
        self,
        clip: ClipEncoder,
        prior: DiffusionPrior,
        prior_sampler: PriorSampler,
        decoder: torch.nn.Module,
        decoder_sampler: GuidedLatentSampler,
        image_size: Sequence[int],
        use_text_tokens: bool = True,
        use_text_mask: bool = False,
        normalize_embeddings: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        dims = {
            "CLIP": clip.embedding_dim,
            "prior": int(prior.standardizer.mean.shape[0]),
            "decoder": int(getattr(decoder, "embedding_dim", clip.embedding_dim)),
        }
        if len(set(dims.values())) != 1:
            raise ValueError(f"The networks disagree on the image embedding size: {dims}.")
        if use_text_mask and not use_text_tokens:
            raise ValueError("`use_text_mask` masks the text tokens: it needs `use_text_tokens`.")
        self.clip = clip
        self.prior = prior
        self.prior_sampler = prior_sampler
        self.decoder = decoder
        self.decoder_sampler = decoder_sampler
        self.image_size = tuple(int(s) for s in image_size)
        self.latent_shape = latent_shape(self.image_size, decoder_sampler.latent_space)
        self.embedding_dim = dims["CLIP"]
        self.use_text_tokens = use_text_tokens
        self.use_text_mask = use_text_mask
        self.normalize_embeddings = normalize_embeddings
        self.device = torch.device(device)

    # -- building blocks --

    @staticmethod
    def _check_seeds(seeds: Sequence[int], count: int) -> list[int]:
        seeds = list(seeds)
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} samples: give one seed per sample.")
        for seed in seeds:
            seed_streams(seed)  # validates
        return [int(s) for s in seeds]

    def _noise(self, seeds: Sequence[int], stream: str, shape: Sequence[int]) -> torch.Tensor:
        """``(B, *shape)`` standard normal noise, sample ``i`` drawn on the CPU from its seed's ``stream``."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed_streams(s)[stream])) for s in seeds]
        ).to(self.device)

    def _generators(self, seeds: Sequence[int], stream: str) -> list[torch.Generator]:
        """One generator per sample on the device, for the scheduler's step noise."""
        return [torch.Generator(device=self.device).manual_seed(seed_streams(s)[stream]) for s in seeds]

    @torch.no_grad()
    def image_embedding_of(
        self, prompts: Sequence[str], seeds: Sequence[int], prior_guidance_scale: float | None = None
    ) -> torch.Tensor:
        """Prompts (``B`` strings) and seeds -> image embeddings ``(B, D_emb)`` sampled by the guided prior."""
        if isinstance(prompts, str):
            raise TypeError("`prompts` must be a sequence of strings, not one string.")
        prompts = [check_prompt(p) for p in prompts]
        seeds = self._check_seeds(seeds, len(prompts))
        self.clip.eval()
        condition = caption_condition(self.clip, prompts, self.use_text_tokens, self.use_text_mask, self.device)
        sampler = _with_guidance(self.prior_sampler, prior_guidance_scale)
        embeddings = sampler(
            self._noise(seeds, "prior_noise", (self.embedding_dim,)),
            self.prior,
            condition["text_embedding"],
            condition.get("text_tokens"),
            condition.get("text_mask"),
            generator=self._generators(seeds, "prior_steps"),
        )
        return F.normalize(embeddings, dim=-1) if self.normalize_embeddings else embeddings

    @torch.no_grad()
    def slice_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Slices ``(B, 1, H, W)`` in [0, 1] -> their CLIP image embeddings ``(B, D_emb)`` on the pipeline's device."""
        if images.ndim != 4:
            raise ValueError(f"Expected slices of shape (B, 1, H, W), got {tuple(images.shape)}.")
        self.clip.eval()
        return self.clip.encode_images(images).to(self.device)

    def decoder_inputs(self, embeddings: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """What the decoder sampler takes for image embeddings ``(B, D_emb)``: the seeded starting noise
        ``(B, *latent_shape)`` and ``{"context", "uncond_context", "generator"}`` (the null embedding is the
        unconditional branch, as in training)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"Expected image embeddings (B, {self.embedding_dim}), got {tuple(embeddings.shape)}.")
        seeds = self._check_seeds(seeds, embeddings.shape[0])
        embeddings = embeddings.to(self.device, torch.float32)
        noise = self._noise(seeds, "decoder_noise", self.latent_shape)
        return noise, {
            "context": embeddings,
            "uncond_context": null_context(embeddings),
            "generator": self._generators(seeds, "decoder_steps"),
        }

    @torch.no_grad()
    def decode(
        self, embeddings: torch.Tensor, seeds: Sequence[int], decoder_guidance_scale: float | None = None
    ) -> torch.Tensor:
        """Image embeddings ``(B, D_emb)`` and seeds -> images ``(B, C, H, W)`` in [0, 1] from the guided decoder."""
        noise, condition = self.decoder_inputs(embeddings, seeds)
        sampler = _with_guidance(self.decoder_sampler, decoder_guidance_scale)
        return sampler(noise, self.decoder, **condition).clamp(0, 1)

    # -- the three uses --

    def text_to_image(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Prompts (``B``) and seeds -> images ``(B, C, H, W)`` in [0, 1]."""
        embeddings = self.image_embedding_of(prompts, seeds, prior_guidance_scale)
        return self.decode(embeddings, seeds, decoder_guidance_scale)

    @torch.no_grad()
    def variations(
        self,
        images: torch.Tensor,
        seeds: Sequence[int],
        decoder_guidance_scale: float | None = None,
        num_variations: int = 1,
    ) -> torch.Tensor:
        """Slices ``(B, 1, H, W)`` in [0, 1] -> ``num_variations`` new images of each, ``(B * num_variations, C, H, W)``.

        Each slice's CLIP image embedding is decoded from fresh noise: variation ``j`` of slice ``i`` (output
        ``i * num_variations + j``) uses seed ``seeds[i] + j``, so variation 0 has the decoder noise of
        ``text_to_image`` with seed ``seeds[i]``.
        """
        if isinstance(num_variations, bool) or not isinstance(num_variations, int) or num_variations < 1:
            raise ValueError(f"`num_variations` must be a positive integer, got {num_variations!r}.")
        seeds = self._check_seeds(seeds, images.shape[0])
        embeddings = self.slice_embeddings(images).repeat_interleave(num_variations, dim=0)
        variation_seeds = [s + j for s in seeds for j in range(num_variations)]
        return self.decode(embeddings, variation_seeds, decoder_guidance_scale)

    def interpolate(
        self,
        prompt_a: str,
        prompt_b: str,
        steps: int,
        seed: int,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """``steps`` images ``(steps, C, H, W)`` going from ``prompt_a`` to ``prompt_b``.

        Both prompts' image embeddings are sampled by the prior with ``seed``; step ``k`` decodes their
        :func:`slerp` at ``k / (steps - 1)``, every step from the same decoder noise (that of ``seed``), so only
        the embedding changes along the way and the ends are ``text_to_image([prompt], [seed])`` of each prompt.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"`steps` must be an integer >= 2 (the two ends included), got {steps!r}.")
        ends = self.image_embedding_of([prompt_a, prompt_b], [seed, seed], prior_guidance_scale)
        embeddings = slerp(ends[0], ends[1], [k / (steps - 1) for k in range(steps)])
        return self.decode(embeddings, [seed] * steps, decoder_guidance_scale)
