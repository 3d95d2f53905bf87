"""Contrastive (CLIP) fine-tuning on image-caption pairs with MONAI's ``SupervisedTrainer``.

Engine wiring (the trainer's default ``SimpleInferer`` calls ``network(inputs, *args, **kwargs)`` and then
``loss_function(pred, target)``)::

    SupervisedTrainer(
        network=ClipEncoder(load_clip(...), tokenizer),   # forward(images, captions) -> (img, txt, logit_scale)
        prepare_batch=ClipPrepareBatch(),                  # -> (images, captions, (), {"captions": captions})
        loss_function=ClipContrastiveLoss(),               # (img, txt, logit_scale), captions -> scalar
        optimizer=torch.optim.AdamW(encoder.parameters()), # includes model.logit_scale: the temperature is learned
        decollate=False,                                   # keep state.output a dict (loss, (img, txt, scale))
    )

The captions are both the network's second input and the loss's target: the loss needs them to know which
pairs share a caption (soft targets, :func:`clip_contrastive_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import PrepareBatch
from torch import nn

from common.metrics.retrieval import same_caption_matrix

__all__ = ["MAX_LOGIT_SCALE", "ClipContrastiveLoss", "ClipPrepareBatch", "clip_contrastive_loss", "contrastive_targets"]

#: CLIP caps the temperature multiplier ``exp(logit_scale)`` at 100.
MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_targets(
    batch_size: int,
    captions: Sequence[str] | None = None,
    soft_targets: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Target distributions ``(B, B)`` of the contrastive loss; each row sums to 1.

    The identity (each image's partner is its own caption), or, with ``soft_targets`` and ``captions``, a row
    uniform over all items whose caption equals item ``i``'s (after whitespace and case normalisation,
    :func:`common.metrics.retrieval.normalize_caption`). The matrix is symmetric, so it serves both directions.
    """
    if captions is None or not soft_targets:
        return torch.eye(batch_size, device=device)
    if len(captions) != batch_size:
        raise ValueError(f"Got {len(captions)} captions for a batch of {batch_size}.")
    same = same_caption_matrix(captions, device).float()
    return same / same.sum(dim=1, keepdim=True)


def clip_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    captions: Sequence[str] | None = None,
    soft_targets: bool = True,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the ``B x B`` image-text similarities, with soft targets for repeats.

    ``logits = exp(logit_scale) * image_emb @ text_emb.T``, the multiplier clamped at 100 as in CLIP (so the
    temperature gets no gradient beyond it); the loss is the mean of the image-to-text (rows) and text-to-image
    (columns) cross-entropies against :func:`contrastive_targets`.

    Why soft targets: a slice data set repeats captions, and the identity target would treat the partner of a
    caption-mate as a negative, pushing identically described images and identical captions apart, which is
    noise the model cannot fit. A uniform target over the items sharing the caption is what the model can
    reach at best (it cannot tell those pairs apart from the text), and keeps the loss a proper cross-entropy
    (its minimum is the target's entropy, ``log m`` for ``m`` duplicates, not 0). Dropping duplicates from the
    negatives instead would leave the duplicates free to drift relative to each other; the soft target asks
    them to be equally similar. With ``soft_targets=False`` (or no captions) the targets are the identity.

    Args:
        image_emb, text_emb: ``(B, D)`` embeddings of the ``B`` pairs (normalised here to unit length).
        logit_scale: the log temperature, a scalar (``CLIPModel.logit_scale``).
        captions: the ``B`` captions, for soft targets.
        soft_targets: uniform targets over repeated captions; ``False`` for the identity.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"Expected two (B, D) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}.")
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    scale = logit_scale.float().exp().clamp(max=100.0)
    logits = scale * image_emb @ text_emb.T  # (image, text)
    targets = contrastive_targets(logits.shape[0], captions, soft_targets, logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))


class ClipContrastiveLoss(nn.Module):
    """:func:`clip_contrastive_loss` as a ``SupervisedTrainer`` loss: ``loss(pred, captions)``.

    ``pred`` is the network's ``(image_emb, text_emb, logit_scale)`` (``ClipEncoder.forward``), ``captions``
    the batch's captions (the target of :class:`ClipPrepareBatch`).
    """

    def __init__(self, soft_targets: bool = True) -> None:
        super().__init__()
        self.soft_targets = soft_targets

    def forward(
        self, pred: tuple[torch.Tensor, torch.Tensor, torch.Tensor], captions: Sequence[str] | None = None
    ) -> torch.Tensor:
        image_emb, text_emb, logit_scale = pred
        return clip_contrastive_loss(image_emb, text_emb, logit_scale, captions, self.soft_targets)


class ClipPrepareBatch(PrepareBatch):
    """Batch dict -> ``(images, captions, (), {"captions": captions})``.

    ``SupervisedTrainer`` then calls ``network(images, captions=captions)`` (``ClipEncoder``) and
    ``loss_function(pred, captions)`` (:class:`ClipContrastiveLoss`). Images ``(B, 1, H, W)`` go to the
    device; captions stay a list of ``B`` strings (tokenized on the network's device by ``ClipEncoder``).
    """

    def __init__(self, image_key: str = "image", caption_key: str = "caption") -> None:
        self.image_key = image_key
        self.caption_key = caption_key

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        captions = batchdata[self.caption_key]
        if isinstance(captions, str):
            raise TypeError(f"Batch key {self.caption_key!r} holds one string; expected one caption per image.")
        captions = list(captions)
        if len(captions) != images.shape[0]:
            raise ValueError(f"Got {len(captions)} captions for {images.shape[0]} images.")
        return images, captions, (), {"captions": captions}
