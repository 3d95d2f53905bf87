"""common.data.transforms: prompt dropout for classifier-free guidance."""

from __future__ import annotations

import pytest

from common.data.transforms import PromptDropoutd, RandReportSentencesd

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


SENTENCES = [
    "Heart size is normal.",
    "Large left pleural effusion.",
    "No pneumothorax.",
    "Lines unchanged.",
    "A.",
    "B.",
]


def test_report_excerpts_draw_every_count_from_one_to_five_in_report_order():
    sampler = RandReportSentencesd(keys="sentences", prompt_key="prompt")
    sampler.set_random_state(seed=0)
    counts = []
    for _ in range(500):
        prompt = sampler({"sentences": SENTENCES})["prompt"]
        chosen = [s for s in SENTENCES if s in prompt]
        assert prompt == " ".join(chosen)  # report order kept, nothing else added
        counts.append(len(chosen))
    assert sorted(set(counts)) == [1, 2, 3, 4, 5]  # 5 included (the article's sampler never drew it)
    assert min(counts.count(k) for k in range(1, 6)) > 60  # about uniform: 100 each expected


def test_report_excerpts_are_reproducible_and_handle_short_or_empty_reports():
    a, b = RandReportSentencesd("sentences"), RandReportSentencesd("sentences")
    a.set_random_state(seed=3)
    b.set_random_state(seed=3)
    assert [a({"sentences": SENTENCES})["prompt"] for _ in range(5)] == [
        b({"sentences": SENTENCES})["prompt"] for _ in range(5)
    ]
    assert a({"sentences": ["Only one."]})["prompt"] == "Only one."
    assert a({"sentences": []})["prompt"] == ""
    with pytest.raises(TypeError, match="list of sentences"):
        a({"sentences": "Heart size is normal. No effusion."})
    with pytest.raises(ValueError, match="min_sentences"):
        RandReportSentencesd("sentences", min_sentences=3, max_sentences=2)
