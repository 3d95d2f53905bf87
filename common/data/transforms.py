"""Dict transforms on training samples (prompt dropout for classifier-free guidance)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform


class PromptDropoutd(RandomizableTransform, MapTransform):
    """Replace the prompt under ``keys`` by ``empty_prompt`` with probability ``prob``.

    Training with a share of empty prompts (10% in the reference recipes) teaches the model the
    unconditional distribution that classifier-free guidance steers away from at sampling time.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.1, empty_prompt: str = "") -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"Prompt dropout probability must be in [0, 1], got {prob}.")
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.empty_prompt = empty_prompt

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, str]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = self.empty_prompt
        return d
