"""Training batches and guided sampling for the unCLIP diffusion prior (:class:`common.networks.prior.DiffusionPrior`).

Training runs in MONAI's ``SupervisedTrainer`` with its default ``SimpleInferer``: :class:`PriorPrepareBatch`
noises the embeddings itself and returns the prior's keyword arguments, so the engine calls
``prior(noisy, timesteps=, text_embedding=, ..., drop_text=)`` directly. (MONAI's ``DiffusionInferer`` cannot
serve: it calls ``network(x=, timesteps=, context=)``, one condition tensor only.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch

from common.diffusion.sampling import GuidedLatentSampler
from common.diffusion.schedules import SchedulerSettings
from common.networks.clip_model import ClipEncoder
from common.networks.prior import EmbeddingStandardizer


@torch.no_grad()
def caption_condition(
    clip: ClipEncoder,
    captions: Sequence[str],
    use_text_tokens: bool = True,
    use_text_mask: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """What the prior is conditioned on for ``B`` captions, from the frozen CLIP (training and sampling alike).

    ``{"text_embedding": (B, D_emb)}`` (unit-norm, ``clip.encode_texts``), plus ``"text_tokens"`` ``(B, 77,
    D_text)`` with ``use_text_tokens`` and ``"text_mask"`` ``(B, 77)`` with ``use_text_mask`` (only for a prior
    trained with one); on ``device`` (the CLIP's by default).
    """
    if isinstance(captions, str):
        raise TypeError("`captions` must be a sequence of strings, not one string.")
    if use_text_mask and not use_text_tokens:
        raise ValueError("`use_text_mask` masks the text tokens: it needs `use_text_tokens`.")
    captions = list(captions)
    condition = {"text_embedding": clip.encode_texts(captions)}
    if use_text_tokens:
        tokens, mask = clip.text_tokens(captions)
        condition["text_tokens"] = tokens
        if use_text_mask:
            condition["text_mask"] = mask
    return {name: value.to(device) if device is not None else value for name, value in condition.items()}


class PriorPrepareBatch(DiffusionPrepareBatch):
    """Batch dict of CLIP embeddings -> a noised x0-prediction training example for the prior.

    The image embeddings ``(B, D)`` are standardised (x0, also the target), noised at random timesteps, and each
    caption is dropped with probability ``drop_prob`` (the prior then sees its null text), which teaches the
    unconditional model classifier-free guidance needs. Noise, timesteps and drops come from torch's global RNG,
    seeded like the rest of training.

    Returns ``(noisy (B, D), x0 (B, D), (), {"timesteps", "text_embedding", "drop_text"[, "text_tokens",
    "text_mask"]})``, the target and arguments of ``DiffusionPrior`` under ``SimpleInferer``.

    Args:
        standardizer: the prior's fitted standardiser (``prior.standardizer``).
        scheduler: the training scheduler (``SchedulerSettings.build``), predicting ``"sample"`` (x0).
        drop_prob: probability of replacing a caption by the null text.
        image_key, text_embedding_key: batch keys of the image and text embeddings ``(B, D)``.
        text_tokens_key: batch key of the token hidden states ``(B, T, D_text)``; ``None`` if the prior gets none.
        text_mask_key: batch key of the token mask ``(B, T)`` (True for real tokens); ``None`` if all are real.
    """

    def __init__(
        self,
        standardizer: EmbeddingStandardizer,
        scheduler: torch.nn.Module,
        drop_prob: float = 0.1,
        image_key: str = "image_embedding",
        text_embedding_key: str = "text_embedding",
        text_tokens_key: str | None = "text_tokens",
        text_mask_key: str | None = None,
    ) -> None:
        if scheduler.prediction_type != "sample":
            raise ValueError(
                f"The prior predicts the clean embedding: its scheduler needs prediction_type 'sample', "
                f"got {scheduler.prediction_type!r}."
            )
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"`drop_prob` must be in [0, 1], got {drop_prob}.")
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        self.standardizer = standardizer
        self.scheduler = scheduler
        self.drop_prob = drop_prob
        self.image_key = image_key
        self.text_keys = {
            "text_embedding": text_embedding_key,
            "text_tokens": text_tokens_key,
            "text_mask": text_mask_key,
        }

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        x0 = self.standardizer.standardize(
            batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        )
        noise = self.get_noise(x0)
        timesteps = self.get_timesteps(x0)
        noisy = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        drop_text = torch.rand(x0.shape[0], device=x0.device) < self.drop_prob
        condition = {
            name: batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)
            for name, key in self.text_keys.items()
            if key is not None
        }
        return noisy, x0, (), {"timesteps": timesteps, "drop_text": drop_text, **condition}


class CaptionPriorPrepareBatch(PriorPrepareBatch):
    """:class:`PriorPrepareBatch` on batches of cached image embeddings and captions, the text side made here.

    Training captions are new phrasings every epoch, so their condition (:func:`caption_condition`, by the frozen
    CLIP, without gradients) is computed per batch: the CLIP text tower is small next to the prior. The image
    embeddings come cached (``common.data.clip_embeddings.ClipImageEmbeddingCache``).

    Args:
        clip: the frozen, fine-tuned CLIP (in eval mode).
        standardizer, scheduler, drop_prob, image_key: as for :class:`PriorPrepareBatch`.
        caption_key: batch key of the ``B`` captions.
        use_text_tokens, use_text_mask: what the prior gets besides the text embedding (as ``UnclipPipeline``).
    """

    def __init__(
        self,
        clip: ClipEncoder,
        standardizer: EmbeddingStandardizer,
        scheduler: torch.nn.Module,
        drop_prob: float = 0.1,
        image_key: str = "image_embedding",
        caption_key: str = "caption",
        use_text_tokens: bool = True,
        use_text_mask: bool = False,
    ) -> None:
        super().__init__(
            standardizer,
            scheduler,
            drop_prob=drop_prob,
            image_key=image_key,
            text_tokens_key="text_tokens" if use_text_tokens else None,
            text_mask_key="text_mask" if use_text_mask else None,
        )
        if use_text_mask and not use_text_tokens:
            raise ValueError("`use_text_mask` masks the text tokens: it needs `use_text_tokens`.")
        self.clip = clip
        self.caption_key = caption_key
        self.use_text_tokens = use_text_tokens
        self.use_text_mask = use_text_mask

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        captions = batchdata[self.caption_key]
        if isinstance(captions, str):
            raise TypeError(f"Batch key {self.caption_key!r} holds one string; expected one caption per item.")
        condition = caption_condition(self.clip, list(captions), self.use_text_tokens, self.use_text_mask)
        return super().__call__({**batchdata, **condition}, device, non_blocking, **kwargs)


class PriorSampler(GuidedLatentSampler):
    """Reverse diffusion of standardised image embeddings with classifier-free guidance, then de-standardisation.

    The guidance machinery is :class:`GuidedLatentSampler`'s (one ``[uncond, cond]`` batch per step, per-sample
    generators, bf16 option); the two branches differ by the prior's ``drop_text`` mask, which therefore plays
    the part of the context: all True (null text) for the unconditional branch, all False for the conditional.
    ``guidance_scale`` 0 samples unconditionally, 1 conditionally, above 1 extrapolates.

    Args:
        settings: the prior's training schedule (``prediction_type`` ``"sample"``), from its checkpoint.
        scheduler, num_inference_steps, guidance_scale, eta, progress, precision: as for
            :class:`GuidedLatentSampler`.
    """

    def __init__(
        self,
        settings: SchedulerSettings,
        scheduler: str = "ddim",
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        eta: float = 0.0,
        progress: bool = False,
        precision: str = "fp32",
    ) -> None:
        # No latent space: the samples are embeddings, de-standardised rather than decoded.
        super().__init__(
            None,  # type: ignore[arg-type]
            settings,
            scheduler=scheduler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            progress=progress,
            precision=precision,
        )

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        text_embedding: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Noise ``(B, D)`` + captions' text embeddings ``(B, D)`` (tokens ``(B, T, D_text)``, mask ``(B, T)``)
        -> image embeddings ``(B, D)`` in CLIP's space (de-standardised with the prior's own statistics)."""
        network.eval()
        keep = torch.zeros(inputs.shape[0], dtype=torch.bool, device=inputs.device)
        condition = {"text_embedding": text_embedding, "text_tokens": text_tokens, "text_mask": text_mask}
        present = {name: value for name, value in condition.items() if value is not None}
        samples = self.sample_latents(inputs, network, keep, ~keep, generator, **present)
        return getattr(network, "module", network).standardizer.destandardize(samples)  # DDP looked through

    def predict(  # type: ignore[override]
        self,
        network: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        **condition: torch.Tensor,
    ) -> torch.Tensor:
        """The prior's x0 prediction ``(B, D)``; ``context`` is its ``drop_text`` mask ``(B,)``."""
        return network(latents, timesteps=timesteps, drop_text=context, **condition)
