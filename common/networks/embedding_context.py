"""The unCLIP decoder's conditioning: a CLIP image embedding as the cross-attention context of a latent diffusion UNet.

:class:`EmbeddingToContext` projects an image embedding ``(B, D_emb)`` to ``num_tokens`` context tokens
``(B, num_tokens, context_dim)`` (DALL-E 2 projects to four extra tokens); :class:`EmbeddingConditionedUNet` puts
it in front of a MONAI ``DiffusionModelUNet`` with cross-attention, so the network's ``context`` *is* the image
embedding.

Classifier-free guidance needs an unconditional model: dropped samples get a learned ``null_embedding`` in place
of their image embedding. A sample is dropped where the ``drop`` mask is True **or where its embedding is the
all-zero vector** (:func:`null_context`), which no CLIP embedding is (they have unit norm). The zero vector is how a
dropped sample travels through code that passes one condition tensor and nothing else:

* training under MONAI's ``DiffusionInferer`` (``network(x=, timesteps=, context=condition)``):
  ``ImageEmbeddingPrepareBatch`` (:mod:`common.diffusion.unclip`) zeroes the embeddings it drops;
* guided sampling by ``GuidedLatentSampler`` (``network(latents, timesteps=, context=)`` on the batch
  ``[uncond_context, context]``): ``uncond_context = null_context(embeddings)``.

Both then reach the same learned null embedding, with no change to either engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

__all__ = ["EmbeddingConditionedUNet", "EmbeddingToContext", "build_embedding_conditioned_unet", "null_context"]


def null_context(embeddings: torch.Tensor) -> torch.Tensor:
    """The unconditional stand-in for ``embeddings`` ``(B, D_emb)``: zeros of the same shape (the null embedding's mark)."""
    return torch.zeros_like(embeddings)


def _as_rows(embedding: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """``(B, D_emb)`` or ``(B, 1, D_emb)`` -> ``(B, D_emb)``; anything else is refused."""
    if embedding.ndim == 3 and embedding.shape[1] == 1:
        embedding = embedding[:, 0]
    if embedding.ndim != 2 or embedding.shape[1] != embedding_dim:
        raise ValueError(
            f"Expected image embeddings of shape (B, {embedding_dim}) or (B, 1, {embedding_dim}), "
            f"got {tuple(embedding.shape)}."
        )
    return embedding


class EmbeddingToContext(nn.Module):
    """Image embeddings ``(B, D_emb)`` -> cross-attention context ``(B, num_tokens, context_dim)``.

    One linear layer to ``num_tokens * context_dim`` values, reshaped to tokens, each token layer-normalised (so
    the context has the scale of a text encoder's normalised hidden states whatever the embedding's norm).

    Args:
        embedding_dim: ``D_emb``, the size of the CLIP image embeddings.
        context_dim: the UNet's ``cross_attention_dim``.
        num_tokens: context tokens per embedding.
    """

    def __init__(self, embedding_dim: int, context_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        for name, value in (("embedding_dim", embedding_dim), ("context_dim", context_dim), ("num_tokens", num_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.embedding_dim = embedding_dim
        self.context_dim = context_dim
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embedding_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)
        self.null_embedding = nn.Parameter(torch.randn(embedding_dim) * 0.02)

    def dropped(self, embedding: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: True where ``drop`` says so or the embedding ``(B, D_emb)`` is all zeros."""
        embedding = _as_rows(embedding, self.embedding_dim)
        mask = (embedding == 0).all(dim=-1)
        if drop is not None:
            drop = drop.to(device=embedding.device, dtype=torch.bool).reshape(-1)
            if drop.shape[0] != embedding.shape[0]:
                raise ValueError(f"`drop` has {drop.shape[0]} entries for {embedding.shape[0]} embeddings.")
            mask = mask | drop
        return mask

    def forward(self, embedding: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Context tokens ``(B, num_tokens, context_dim)``.

        Args:
            embedding: image embeddings ``(B, D_emb)`` (or ``(B, 1, D_emb)``); an all-zero row is a dropped sample.
            drop: ``(B,)`` bool, True where the learned ``null_embedding`` replaces the sample's embedding.
        """
        embedding = _as_rows(embedding, self.embedding_dim)
        mask = self.dropped(embedding, drop)
        null = self.null_embedding.to(embedding.dtype).expand_as(embedding)
        embedding = torch.where(mask[:, None], null, embedding)
        tokens = self.proj(embedding).reshape(embedding.shape[0], self.num_tokens, self.context_dim)
        return self.norm(tokens)


class EmbeddingConditionedUNet(nn.Module):
    """A cross-attention ``DiffusionModelUNet`` whose ``context`` is a CLIP image embedding: the unCLIP decoder.

    ``forward(x, timesteps, context)`` has the signature of the UNet, so MONAI's ``DiffusionInferer`` (training)
    and the project's ``GuidedLatentSampler`` (guided sampling) call it unchanged:

    * ``x``: noisy latents ``(B, c, h, w)``; ``timesteps``: ``(B,)``;
    * ``context``: image embeddings ``(B, D_emb)`` or ``(B, 1, D_emb)``; all-zero rows (:func:`null_context`) and
      rows where ``drop`` ``(B,)`` is True get the learned null embedding;
    * returns the UNet's prediction ``(B, c, h, w)``.

    Other keyword arguments (``class_labels``, ControlNet residuals) go to the UNet.

    Args:
        unet: a ``DiffusionModelUNet`` built with ``with_conditioning=True`` (its ``cross_attention_dim`` must be
            ``projection.context_dim``).
        projection: the :class:`EmbeddingToContext` in front of it.
    """

    def __init__(self, unet: DiffusionModelUNet, projection: EmbeddingToContext) -> None:
        super().__init__()
        self.unet = unet
        self.projection = projection

    @property
    def embedding_dim(self) -> int:
        """``D_emb``, the size of the image embeddings taken as context."""
        return self.projection.embedding_dim

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        if context is None:
            raise ValueError(
                "The unCLIP decoder needs `context`: the image embeddings (B, D_emb); pass "
                "`null_context(embeddings)` (zeros) for unconditional samples."
            )
        return self.unet(x, timesteps=timesteps, context=self.projection(context, drop), **unet_kwargs)


def build_embedding_conditioned_unet(
    unet: Mapping[str, Any], embedding_dim: int, num_tokens: int = 4
) -> EmbeddingConditionedUNet:
    """An :class:`EmbeddingConditionedUNet` from plain arguments, for architecture records (``build_network``).

    Args:
        unet: keyword arguments of ``DiffusionModelUNet``; ``with_conditioning`` must be true and
            ``cross_attention_dim`` is the context width.
        embedding_dim: ``D_emb`` of the CLIP image embeddings.
        num_tokens: context tokens per embedding.
    """
    args = dict(unet)
    if not args.get("with_conditioning") or not args.get("cross_attention_dim"):
        raise ValueError(
            "The unCLIP decoder's UNet needs cross-attention: give `with_conditioning: true` and a "
            "`cross_attention_dim` in its arguments."
        )
    projection = EmbeddingToContext(embedding_dim, int(args["cross_attention_dim"]), num_tokens)
    return EmbeddingConditionedUNet(DiffusionModelUNet(**args), projection)
