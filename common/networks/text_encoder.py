"""Frozen CLIP text encoders that turn prompts into cross-attention context.

Three sources, all offline at run time:

* a local transformers directory (``CLIPTextModel.save_pretrained`` layout);
* a hub id pinned to a 40-hex commit (never an unpinned name: hub contents change and disappear);
* a small ``CLIPTextModel`` defined in a bundle config whose state dict ships in the bundle's ``models/``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from common.networks.tokenizer import load_clip_tokenizer, tokenize_prompts

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def build_clip_text_model(
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int | None = None,
    vocab_size: int = 49408,
    max_position_embeddings: int = 77,
) -> CLIPTextModel:
    """A CLIP text tower of the given size with the CLIP vocabulary (ids of ``common.text.tokenizer``)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return CLIPTextModel(config)


def load_pretrained_text_model(source: str, revision: str | None = None, subfolder: str = "") -> CLIPTextModel:
    """Load a transformers ``CLIPTextModel`` from a local directory, or from a hub id pinned to a commit.

    Raises:
        ValueError: for a hub id without a 40-hex ``revision``.
        FileNotFoundError: for a hub id that is not in the local cache (nothing is downloaded at run time).
    """
    path = Path(source)
    if path.is_dir():
        return CLIPTextModel.from_pretrained(path, subfolder=subfolder, local_files_only=True)
    if revision is None or not _COMMIT.match(revision):
        raise ValueError(
            f"Text encoder '{source}' is neither a local directory nor pinned: give `text_encoder_revision` "
            "as the 40-character commit hash of the hub repository (an unpinned name can change or vanish)."
        )
    try:
        return CLIPTextModel.from_pretrained(source, revision=revision, subfolder=subfolder, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"Text encoder '{source}'@{revision} is not in the local Hugging Face cache. Fetch it once with "
            f"`huggingface-cli download {source} --revision {revision}` on a machine with network access, "
            "or point `text_encoder` at a local directory."
        ) from err


def load_text_model(
    text_encoder: str | None, revision: str | None, weights_path: str | Path, how_to_get: str = ""
) -> CLIPTextModel:
    """The text tower a bundle uses: a pretrained one if ``text_encoder`` is given, else the bundle's own file.

    ``text_encoder``: a local transformers directory or a hub id pinned with ``revision`` (see
    :func:`load_pretrained_text_model`); ``None`` loads ``weights_path`` (entry ``"text_encoder"``), whose
    architecture is recorded in the file (``common.networks.architecture``).
    """
    if text_encoder:
        return load_pretrained_text_model(text_encoder, revision)
    from common.networks.architecture import load_network

    return load_network(weights_path, "text_encoder", how_to_get=how_to_get)


class CLIPPromptEncoder(nn.Module):
    """Frozen tokenizer + CLIP text tower: prompts -> context ``(B, 77, hidden_size)``.

    The tower runs without gradients and in eval mode whatever the surrounding engine does, and the
    embedding of each distinct prompt is computed once and cached (training sees few distinct prompts).

    Args:
        tokenizer_path: local CLIP tokenizer directory (``tools/build_clip_tokenizer.py``).
        text_model: the CLIP text tower.
        hidden_layer: which hidden state is the context; ``-1`` is the last layer. Stable Diffusion 2
            uses the penultimate layer (``-2``) of OpenCLIP ViT-H/14, followed by the final layer norm.
        cache_size: the most prompts kept in the cache.
    """

    def __init__(
        self, tokenizer_path: str, text_model: CLIPTextModel, hidden_layer: int = -1, cache_size: int = 4096
    ) -> None:
        super().__init__()
        self.tokenizer = load_clip_tokenizer(tokenizer_path)
        self.text_model = text_model.eval().requires_grad_(False)
        self.hidden_layer = hidden_layer
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}
        self._warned_truncation: set[str] = set()

    @property
    def context_dim(self) -> int:
        return self.text_model.config.hidden_size

    def train(self, mode: bool = True) -> CLIPPromptEncoder:
        # The tower stays frozen: engines calling .train() on their networks must not switch dropout on.
        return super().train(False)

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids, truncated = tokenize_prompts(self.tokenizer, prompts)
        for prompt, cut in zip(prompts, truncated, strict=True):
            if cut and prompt not in self._warned_truncation:
                self._warned_truncation.add(prompt)
                logger.warning("Prompt truncated to 77 CLIP tokens: %r", prompt)
        out = self.text_model(input_ids=ids.to(device), output_hidden_states=self.hidden_layer != -1)
        if self.hidden_layer == -1:
            return out.last_hidden_state
        hidden = out.hidden_states[self.hidden_layer]
        return getattr(self.text_model, "text_model", self.text_model).final_layer_norm(hidden)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encode ``prompts`` (B strings) into context of shape ``(B, 77, context_dim)`` on the tower's device."""
        if isinstance(prompts, str):
            raise TypeError("`prompts` must be a sequence of strings, not one string.")
        device = next(self.text_model.parameters()).device
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            embeddings = self._encode(missing, device)
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache = {p: self._cache[p] for p in prompts if p in self._cache}
            for prompt, emb in zip(missing, embeddings, strict=True):
                self._cache[prompt] = emb
        return torch.stack([self._cache[p].to(device) for p in prompts])

    def _apply(self, fn, recurse=True):
        # Moving the module (.to(device)) invalidates cached tensors living on the old device.
        self._cache.clear()
        return super()._apply(fn, recurse)
