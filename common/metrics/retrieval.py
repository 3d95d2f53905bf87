"""Metrics of a CLIP embedding space: cross-modal retrieval Recall@K (with its chance level) and CLIPScore.

Captions repeat in a slice data set ("axial T1 slice of a healthy brain" describes many images), so a retrieval
hit is any item whose caption equals the query's, not only the query's own partner: with duplicates, the
partner is indistinguishable from its caption-mates, and counting only it would cap recall below 1.
Captions are compared after :func:`normalize_caption` (whitespace collapsed, case folded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.metrics import Metric

__all__ = [
    "RetrievalRecall",
    "chance_recall_at_k",
    "clip_score",
    "normalize_caption",
    "retrieval_recall_at_k",
    "same_caption_matrix",
]


def normalize_caption(caption: str) -> str:
    """The form in which two captions are compared: runs of whitespace collapsed to one space, case folded."""
    return " ".join(caption.split()).casefold()


def same_caption_matrix(captions: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, N)`` bool matrix, True where captions ``i`` and ``j`` are equal after :func:`normalize_caption`."""
    if isinstance(captions, str):
        raise TypeError("`captions` must be a sequence of strings, not one string.")
    ids: dict[str, int] = {}
    labels = torch.tensor([ids.setdefault(normalize_caption(c), len(ids)) for c in captions], device=device)
    return labels[:, None] == labels[None, :]


def _relevance(n: int, captions: Sequence[str] | None, device: torch.device) -> torch.Tensor:
    if captions is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    if len(captions) != n:
        raise ValueError(f"Got {len(captions)} captions for {n} pairs of embeddings.")
    return same_caption_matrix(captions, device)


def _recall(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Fraction of query rows whose best relevant item ranks in the top ``k``; ties count against the query."""
    best_relevant = similarity.masked_fill(~relevant, -math.inf).amax(dim=1, keepdim=True)
    rank = (similarity.masked_fill(relevant, -math.inf) >= best_relevant).sum(dim=1)  # irrelevant items not below
    return (rank < k).float().mean().item()


@torch.no_grad()
def retrieval_recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    captions: Sequence[str] | None = None,
) -> dict[str, float]:
    """Cross-modal Recall@K of ``N`` paired embeddings, ranked by cosine similarity.

    Text-to-image: each caption ``i`` queries the ``N`` images; it is a hit at ``K`` when an image relevant to it
    is among the ``K`` most similar. Relevant means: the image whose caption equals caption ``i`` (any of them
    when captions repeat), or image ``i`` alone when ``captions`` is ``None``. Image-to-text likewise.
    Ties are counted pessimistically (an irrelevant item as similar as the best relevant one ranks before it),
    so collapsed embeddings score 0, never above chance (:func:`chance_recall_at_k`).

    Args:
        image_emb, text_emb: ``(N, D)`` embeddings of pair ``i`` in row ``i`` (normalised here).
        ks: the cut-offs ``K``.
        captions: the ``N`` captions, or ``None`` when every pair is its own class.

    Returns:
        ``{"text_to_image_R@K": .., "image_to_text_R@K": ..}`` for each ``K``, fractions in [0, 1].
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"Expected two (N, D) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}.")
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.to(image_emb), dim=-1)
    relevant = _relevance(image_emb.shape[0], captions, image_emb.device)
    similarity = text_emb @ image_emb.T  # (text, image)
    metrics = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"Recall@K needs K >= 1, got {k}.")
        metrics[f"text_to_image_R@{k}"] = _recall(similarity, relevant, k)
        metrics[f"image_to_text_R@{k}"] = _recall(similarity.T, relevant.T, k)
    return metrics


def chance_recall_at_k(n: int, k: int, captions: Sequence[str] | None = None) -> float:
    """Expected Recall@K of a random ranking of ``n`` items, in either direction.

    A query with ``m`` relevant items (those sharing its caption, itself included; ``m = 1`` without
    captions) misses when a uniformly random top ``K`` holds none of them: ``P(hit) = 1 - C(n - m, K) / C(n, K)``,
    averaged over the queries. Without duplicates this is ``K / n``.
    """
    if n < 1 or k < 1:
        raise ValueError(f"Need n >= 1 and k >= 1, got n={n}, k={k}.")
    k = min(k, n)
    sizes = [1] * n if captions is None else _relevance(n, captions, torch.device("cpu")).sum(dim=1).tolist()
    total = math.comb(n, k)
    return sum(1.0 - math.comb(n - m, k) / total for m in sizes) / n


@torch.no_grad()
def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float = 100.0) -> float:
    """CLIPScore of paired embeddings: the mean over pairs of ``scale * max(cos(image_i, text_i), 0)``.

    Hessel et al. (2021), "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", define
    ``w * max(cos, 0)`` with ``w = 2.5``; the default here is ``scale = 100`` (torchmetrics' and most text-to-image
    papers' convention, values in [0, 100]); pass ``scale=2.5`` for the paper's.

    Args:
        image_emb, text_emb: ``(N, D)`` embeddings of pair ``i`` in row ``i`` (normalised here).
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"Expected two (N, D) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}.")
    cosine = F.cosine_similarity(image_emb.float(), text_emb.to(image_emb.device).float(), dim=-1)
    return (scale * cosine.clamp_min(0)).mean().item()


class RetrievalRecall(Metric):
    """Recall@K of :func:`retrieval_recall_at_k` over a whole validation set, as an Ignite metric.

    Each iteration's output, after ``output_transform``, is ``(image_emb (B, D), text_emb (B, D), captions)``;
    the embeddings and captions of every iteration (and of every process, under ``torch.distributed``) are
    gathered and ranked together, so the figure does not depend on the batch size.

    Args:
        k: the cut-off ``K``.
        direction: ``"text_to_image"`` (each caption queries the images) or ``"image_to_text"``.
        output_transform: engine output -> ``(image_emb, text_emb, captions)``.
    """

    def __init__(
        self,
        k: int = 5,
        direction: str = "text_to_image",
        output_transform: Callable[[Any], Any] = lambda output: output,
    ) -> None:
        if direction not in ("text_to_image", "image_to_text"):
            raise ValueError(f"`direction` must be 'text_to_image' or 'image_to_text', got {direction!r}.")
        if k < 1:
            raise ValueError(f"Recall@K needs K >= 1, got {k}.")
        self.k = k
        self.direction = direction
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._images: list[torch.Tensor] = []
        self._texts: list[torch.Tensor] = []
        self._captions: list[str] = []

    def update(self, output: tuple[torch.Tensor, torch.Tensor, Sequence[str]]) -> None:
        image_emb, text_emb, captions = output
        if isinstance(captions, str) or len(captions) != image_emb.shape[0]:
            raise ValueError(f"Expected one caption per embedding ({image_emb.shape[0]}), got {captions!r:.80}.")
        self._images.append(image_emb.detach().float().cpu())
        self._texts.append(text_emb.detach().float().cpu())
        self._captions.extend(captions)

    def compute(self) -> float:
        if not self._images:
            raise RuntimeError("RetrievalRecall needs at least one update before compute.")
        images, texts, captions = torch.cat(self._images), torch.cat(self._texts), list(self._captions)
        if idist.get_world_size() > 1:
            images = idist.all_gather(images.to(idist.device())).cpu()
            texts = idist.all_gather(texts.to(idist.device())).cpu()
            captions = [c for part in idist.all_gather(captions) for c in part]
        return retrieval_recall_at_k(images, texts, (self.k,), captions)[f"{self.direction}_R@{self.k}"]
