"""The unCLIP diffusion prior: a caption's CLIP text embedding (and tokens) -> a CLIP image embedding.

The prior is a diffusion model over standardised image embeddings that predicts the clean embedding (x0)
directly. Classifier-free guidance needs an unconditional model too: the same network with the text swapped
for learned "null" embeddings, per sample, through the ``drop_text`` mask of :meth:`DiffusionPrior.forward`.
"""

from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

#: Sequence slots after the text tokens: text embedding, timestep, noisy image embedding, query.
_NUM_SLOTS = 4


class EmbeddingStandardizer(nn.Module):
    """Per-dimension standardisation of embeddings, with statistics kept in the state dict.

    The prior diffuses ``(e - mean) / std`` so that its noise schedule sees unit-variance data; the statistics
    (buffers ``mean``, ``std`` ``(D,)`` and ``fitted``) travel with the weights and sampling undoes the
    standardisation with the very values training used.

    Args:
        embedding_dim: ``D``, the size of one embedding.
        eps: the smallest standard deviation kept, so a constant dimension does not divide by zero.
    """

    def __init__(self, embedding_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(embedding_dim))
        self.register_buffer("std", torch.ones(embedding_dim))
        # A bare standardiser is the identity: refusing to use it catches a forgotten fit or a missing load.
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> EmbeddingStandardizer:
        """Set ``mean`` and ``std`` from ``embeddings`` ``(N, D)`` (the whole training set, identical on every rank)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.mean.shape[0] or embeddings.shape[0] < 2:
            raise ValueError(
                f"Fit on embeddings of shape (N >= 2, {self.mean.shape[0]}), got {tuple(embeddings.shape)}."
            )
        embeddings = embeddings.to(self.mean)
        self.mean.copy_(embeddings.mean(dim=0))
        self.std.copy_(embeddings.std(dim=0).clamp_min(self.eps))
        self.fitted.fill_(True)
        return self

    def standardize(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)`` -> standardised embeddings ``(B, D)``."""
        self._check_fitted()
        return (embeddings - self.mean) / self.std

    def destandardize(self, standardized: torch.Tensor) -> torch.Tensor:
        """Standardised embeddings ``(B, D)`` -> embeddings ``(B, D)``."""
        self._check_fitted()
        return standardized * self.std + self.mean

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(
                "The embedding standardiser has no statistics: call `fit` on the training image embeddings "
                "before training, or load the prior's weights before sampling."
            )


class DiffusionPrior(nn.Module):
    """Pre-norm transformer denoiser of standardised CLIP image embeddings, conditioned on a caption.

    The input sequence (width ``W``) is ``[text tokens (T)] + [text embedding] + [timestep] + [noisy image
    embedding] + [learned query]``, with learned position embeddings; the output at the query token, after a
    final layer norm and a projection to ``embedding_dim``, is the x0 prediction. Attention is bidirectional
    (no causal mask): only the query's output is read, and it attends to every token either way.

    Guidance dropout: where ``drop_text`` is True the sample's text embedding and tokens are replaced by the
    learned ``null_text_embedding`` and ``null_text_tokens`` (all visible), so training's prompt dropout and
    sampling's unconditional branch use the same null condition, and callers never handle it themselves.

    Args:
        embedding_dim: ``D_emb``, size of the CLIP (text and image) embeddings.
        text_token_dim: ``D_text``, size of the text encoder's per-token hidden states.
        width: ``W``, the transformer width (a multiple of ``num_heads``).
        num_layers, num_heads: transformer depth and attention heads.
        max_text_tokens: the longest token sequence accepted (77 for CLIP).
        dropout: dropout inside the transformer layers.
    """

    def __init__(
        self,
        embedding_dim: int,
        text_token_dim: int,
        width: int,
        num_layers: int,
        num_heads: int,
        max_text_tokens: int = 77,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.width = width
        self.max_text_tokens = max_text_tokens
        self.text_token_proj = nn.Linear(text_token_dim, width)
        self.text_embedding_proj = nn.Linear(embedding_dim, width)
        self.image_embedding_proj = nn.Linear(embedding_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        # Positions max_text_tokens..+3 are the fixed slots, whatever the number of text tokens.
        self.positions = nn.Parameter(torch.randn(max_text_tokens + _NUM_SLOTS, width) * 0.02)
        self.null_text_embedding = nn.Parameter(torch.randn(embedding_dim) * 0.02)
        self.null_text_tokens = nn.Parameter(torch.randn(max_text_tokens, text_token_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            num_heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors do not apply to pre-norm layers; disabling them says so without a warning.
        self.transformer = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.output_proj = nn.Linear(width, embedding_dim)
        self.standardizer = EmbeddingStandardizer(embedding_dim)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        text_embedding: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the clean standardised image embedding.

        Args:
            x: noisy standardised image embeddings ``(B, D_emb)``.
            timesteps: diffusion timesteps ``(B,)`` (int64).
            text_embedding: the captions' CLIP text embeddings ``(B, D_emb)``.
            text_tokens: the captions' per-token hidden states ``(B, T, D_text)``, ``T <= max_text_tokens``.
            text_mask: ``(B, T)`` bool, True for real tokens, False for padding; all real when omitted.
            drop_text: ``(B,)`` bool, True where the text is replaced by the null condition.

        Returns:
            the x0 prediction ``(B, D_emb)``.
        """
        if text_tokens is not None and text_tokens.shape[1] > self.max_text_tokens:
            raise ValueError(f"{text_tokens.shape[1]} text tokens exceed `max_text_tokens` ({self.max_text_tokens}).")
        if drop_text is not None:
            text_embedding, text_tokens, text_mask = self._drop(drop_text, text_embedding, text_tokens, text_mask)
        batch = x.shape[0]
        slots = torch.stack(
            [
                self.text_embedding_proj(text_embedding),
                self.time_mlp(get_timestep_embedding(timesteps, self.width).to(x.dtype)),
                self.image_embedding_proj(x),
                self.query.expand(batch, -1),
            ],
            dim=1,
        )
        slots = slots + self.positions[-_NUM_SLOTS:]
        padding = None
        if text_tokens is not None:
            tokens = self.text_token_proj(text_tokens) + self.positions[: text_tokens.shape[1]]
            slots = torch.cat([tokens, slots], dim=1)
            if text_mask is not None:
                # key padding mask: True = ignored; the fixed slots are always attended
                padding = torch.cat([~text_mask.bool(), text_mask.new_zeros(batch, _NUM_SLOTS, dtype=torch.bool)], 1)
        hidden = self.transformer(slots, src_key_padding_mask=padding)
        return self.output_proj(hidden[:, -1])

    def _drop(
        self,
        drop_text: torch.Tensor,
        text_embedding: torch.Tensor,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The condition with the null text swapped in where ``drop_text`` ``(B,)`` is True."""
        drop = drop_text.bool().to(text_embedding.device)
        text_embedding = torch.where(drop[:, None], self.null_text_embedding.to(text_embedding.dtype), text_embedding)
        if text_tokens is not None:
            null_tokens = self.null_text_tokens[: text_tokens.shape[1]].to(text_tokens.dtype)
            text_tokens = torch.where(drop[:, None, None], null_tokens, text_tokens)
            if text_mask is not None:
                text_mask = text_mask.bool() | drop[:, None]  # the null tokens are all real
        return text_embedding, text_tokens, text_mask
