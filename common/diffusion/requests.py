"""Sample requests: what to generate, each with its own seed, and the seeded noise it starts from."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform

from common.data.condition_images import ConditionImage

MAX_PROMPT_CHARS = 1000


def check_prompt(prompt: str, allow_empty: bool = False, max_prompt_chars: int = MAX_PROMPT_CHARS) -> str:
    """Refuse a prompt that is not text, empty (unless ``allow_empty``) or longer than ``max_prompt_chars``.

    Every bundle treats prompts alike: beyond 1000 characters a prompt is refused; between CLIP's 77 tokens and that,
    the text encoder truncates it and says so.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    if not allow_empty and not prompt.strip():
        raise ValueError('`prompt` is empty: give a description of the image to generate with --prompt "..."')
    if len(prompt) > max_prompt_chars:
        raise ValueError(
            f"`prompt` has {len(prompt)} characters, more than the {max_prompt_chars} accepted; CLIP reads at most "
            "77 tokens (longer prompts are truncated, with a warning): shorten it."
        )
    return prompt


def sample_requests(
    prompt: str, num_samples: int, seed: int, max_prompt_chars: int = MAX_PROMPT_CHARS
) -> list[dict[str, Any]]:
    """One dict per image to generate: ``{"prompt", "seed", "index"}``; sample ``i`` uses ``seed + i``.

    Seeding each sample on its own makes an image depend only on (prompt, seed), not on batch size.
    """
    check_prompt(prompt, max_prompt_chars=max_prompt_chars)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    return [{"prompt": prompt, "seed": seed + i, "index": i} for i in range(num_samples)]


def with_seeds(items: Sequence[Mapping[str, Any]], seed: int, prompt: str | None = None) -> list[dict[str, Any]]:
    """Copies of ``items`` with ``"seed": seed + i``, so that evaluating item ``i`` is reproducible on its own.

    A ``prompt`` other than ``None`` is added to every item as ``"prompt"`` (one prompt for a whole split).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    extra = {} if prompt is None else {"prompt": str(prompt)}
    return [{**item, **extra, "seed": seed + i} for i, item in enumerate(items)]


class SeededNoised(MapTransform):
    """Add ``noise``: a standard normal tensor of ``shape`` drawn from ``torch.Generator(seed)``.

    The seed is read from ``data[seed_key]``; noise is drawn on the CPU so that a seed gives the same
    image on every device.
    """

    def __init__(self, shape: Sequence[int], seed_key: str = "seed", noise_key: str = "noise") -> None:
        super().__init__(keys=[seed_key])
        self.shape = tuple(int(s) for s in shape)
        self.seed_key = seed_key
        self.noise_key = noise_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        generator = torch.Generator().manual_seed(int(d[self.seed_key]))
        d[self.noise_key] = torch.randn(self.shape, generator=generator)
        return d


def translation_requests(condition: ConditionImage, seed: int, prompt: str = "") -> list[dict[str, Any]]:
    """One request per slice: ``{"condition", "seed", "slice", "prompt"}``.

    Every slice of a volume starts from the noise of the same ``seed``, so the output depends only on the
    input and the seed (not on batching), and neighbouring slices are drawn alike.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    check_prompt(prompt, allow_empty=True)
    return [
        {"condition": condition.slices[k], "seed": seed, "slice": k, "prompt": prompt}
        for k in range(condition.slices.shape[0])
    ]
