"""Dict transforms on training samples: report excerpts as prompts, and prompt dropout for classifier-free guidance."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

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


class RandReportSentencesd(RandomizableTransform, MapTransform):
    """A prompt made of ``k`` random sentences of a report, ``k`` uniform in ``[min_sentences, max_sentences]``.

    The text-to-radiograph recipe conditions on excerpts of 1 to 5 report sentences, so the model learns from short
    and long prompts alike (every count is drawn equally often, the largest included; the article's sampler never
    drew 5, an off-by-one not repeated here). The chosen sentences keep their order in the report and are joined
    with spaces into ``data[prompt_key]``. A report with fewer sentences than ``k`` gives all of them; one with
    none gives the empty prompt. Draws use the transform's own random state, so ``set_determinism`` makes them
    reproducible.

    Args:
        keys: the key of the sentence list (``"sentences"`` in the chest X-ray datalist).
        prompt_key: where the prompt goes.
        min_sentences, max_sentences: inclusive bounds of ``k``.
    """

    def __init__(
        self, keys: KeysCollection, prompt_key: str = "prompt", min_sentences: int = 1, max_sentences: int = 5
    ) -> None:
        if not 1 <= min_sentences <= max_sentences:
            raise ValueError(f"Need 1 <= min_sentences <= max_sentences, got {min_sentences} and {max_sentences}.")
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.prompt_key = prompt_key
        self.min_sentences = min_sentences
        self.max_sentences = max_sentences

    def excerpt(self, sentences: Sequence[str]) -> str:
        """One random excerpt of ``sentences`` (report order kept)."""
        sentences = [s for s in sentences if s.strip()]
        if not sentences:
            return ""
        count = int(self.R.randint(self.min_sentences, self.max_sentences + 1))  # high is exclusive: +1
        chosen = sorted(self.R.choice(len(sentences), size=min(count, len(sentences)), replace=False))
        return " ".join(sentences[i].strip() for i in chosen)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, str):
                raise TypeError(f"'{key}' must be a list of sentences, got a string; split the report first.")
            d[self.prompt_key] = self.excerpt(value)
        return d
