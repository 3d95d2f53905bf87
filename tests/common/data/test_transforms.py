"""common.data.transforms: prompt dropout for classifier-free guidance."""

from __future__ import annotations

import pytest

from common.data.transforms import PromptDropoutd

PROMPT = "T1-weighted image of a brain."


def test_prompt_dropout_always():
    data = {"caption": PROMPT, "image": 1}
    out = PromptDropoutd(keys="caption", prob=1.0)(data)
    assert out == {"caption": "", "image": 1}
    assert data["caption"] == PROMPT  # input not mutated


def test_prompt_dropout_never():
    out = PromptDropoutd(keys=["caption"], prob=0.0)({"caption": PROMPT})
    assert out["caption"] == PROMPT


def test_prompt_dropout_custom_empty_prompt_and_several_keys():
    out = PromptDropoutd(keys=["a", "b"], prob=1.0, empty_prompt="<none>")({"a": "x", "b": "y", "c": "z"})
    assert out == {"a": "<none>", "b": "<none>", "c": "z"}


@pytest.mark.parametrize("prob", [-0.1, 1.5])
def test_prompt_dropout_invalid_prob(prob):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PromptDropoutd(keys="caption", prob=prob)


def test_prompt_dropout_rate_and_reproducibility():
    def draws(seed):
        t = PromptDropoutd(keys="caption", prob=0.1)
        t.set_random_state(seed=seed)
        return [t({"caption": PROMPT})["caption"] == "" for _ in range(2000)]

    a = draws(0)
    assert a == draws(0)
    assert 0.07 < sum(a) / len(a) < 0.13
