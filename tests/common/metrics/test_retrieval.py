"""common.metrics.retrieval: Recall@K with repeated captions, its chance level, CLIPScore."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from common.metrics.retrieval import (
    RetrievalRecall,
    chance_recall_at_k,
    clip_score,
    normalize_caption,
    retrieval_recall_at_k,
    same_caption_matrix,
)


def _axes(*indices: int, dim: int = 4) -> torch.Tensor:
    """Rows ``e_i`` of the identity: unit embeddings on the given axes."""
    return torch.eye(dim)[list(indices)]


def test_same_caption_matrix_normalizes_whitespace_and_case():
    captions = ["A bright  blob", "a bright blob ", "a dark blob", "A\tBRIGHT blob"]
    assert normalize_caption(" A\tBRIGHT  blob\n") == "a bright blob"
    expected = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_caption_matrix(captions), expected)
    with pytest.raises(TypeError):
        same_caption_matrix("a caption")


def test_recall_without_captions_counts_only_the_partner():
    # text i is closest to image perm[i]: texts 0 and 1 find their own image, 2 and 3 swap theirs
    images = _axes(0, 1, 2, 3)
    texts = _axes(0, 1, 3, 2) + 0.1 * _axes(1, 0, 2, 3)  # second-best: texts 2 and 3 rank their own image 2nd
    metrics = retrieval_recall_at_k(images, texts, ks=(1, 2, 5))
    assert metrics["text_to_image_R@1"] == 0.5
    assert metrics["text_to_image_R@2"] == 1.0
    assert metrics["text_to_image_R@5"] == 1.0  # K beyond N
    assert metrics["image_to_text_R@1"] == 0.5
    assert set(metrics) == {f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 2, 5)}


def test_recall_counts_any_image_sharing_the_caption():
    captions = ["bright", "bright", "dark", "dark"]
    images = _axes(0, 1, 2, 3)
    # text 0 points at image 1 (its caption-mate: a hit); text 2 points at image 0 (a miss), image 3 second
    texts = _axes(1, 1, 0, 3) + 0.1 * _axes(0, 0, 3, 2)
    with_captions = retrieval_recall_at_k(images, texts, ks=(1, 2), captions=captions)
    assert with_captions["text_to_image_R@1"] == 0.75
    assert with_captions["text_to_image_R@2"] == 1.0
    without = retrieval_recall_at_k(images, texts, ks=(1,))
    assert without["text_to_image_R@1"] == 0.5  # texts 1 and 3 only
    # image queries: image 0 (bright) is closest to text 2 (dark), a miss; images 1, 2, 3 to texts 0-1, 3, 3
    assert with_captions["image_to_text_R@1"] == 0.75


def test_ties_count_against_the_query():
    # collapsed embeddings: every item ties with the three irrelevant ones, which rank before it
    collapsed = torch.ones(4, 3)
    metrics = retrieval_recall_at_k(collapsed, collapsed, ks=(1, 3, 4))
    assert metrics["text_to_image_R@1"] == metrics["image_to_text_R@1"] == 0.0
    assert metrics["text_to_image_R@3"] == 0.0
    assert metrics["text_to_image_R@4"] == 1.0
    # a tie with a caption-mate is no tie against the query
    both = retrieval_recall_at_k(collapsed, collapsed, ks=(1,), captions=["a", "a", "b", "b"])
    assert both["text_to_image_R@1"] == 0.0
    assert retrieval_recall_at_k(collapsed, collapsed, ks=(1,), captions=["a"] * 4)["text_to_image_R@1"] == 1.0


def test_recall_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        retrieval_recall_at_k(torch.rand(3, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="captions"):
        retrieval_recall_at_k(torch.rand(3, 4), torch.rand(3, 4), captions=["a", "b"])
    with pytest.raises(ValueError, match="K >= 1"):
        retrieval_recall_at_k(torch.rand(3, 4), torch.rand(3, 4), ks=(0,))


def _enumerated_chance(n: int, k: int, captions: list[str]) -> float:
    """Recall@K averaged over every ordering of the items and every query."""
    hits, count = 0, 0
    for order in itertools.permutations(range(n)):
        top = {captions[j] for j in order[:k]}
        hits += sum(c in top for c in captions)
        count += n
    return hits / count


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("captions", [["a", "b", "c", "d", "e"], ["a", "a", "b", "c", "c"], ["a", "a", "a", "b", "b"]])
def test_chance_recall_matches_enumeration(captions, k):
    assert chance_recall_at_k(5, k, captions) == pytest.approx(_enumerated_chance(5, k, captions), abs=1e-12)


def test_chance_recall_closed_forms():
    assert chance_recall_at_k(32, 1) == pytest.approx(1 / 32)
    assert chance_recall_at_k(32, 5) == pytest.approx(5 / 32)
    assert chance_recall_at_k(32, 1, ["x", "y", "z", "w"] * 8) == pytest.approx(8 / 32)
    assert chance_recall_at_k(10, 20) == 1.0
    assert chance_recall_at_k(6, 2, ["a"] * 3 + ["b"] * 3) == pytest.approx(1 - math.comb(3, 2) / math.comb(6, 2))
    with pytest.raises(ValueError):
        chance_recall_at_k(0, 1)
    with pytest.raises(ValueError, match="captions"):
        chance_recall_at_k(3, 1, ["a"])


def test_clip_score():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[2.0, 0.0], [0.5, 0.5 * math.sqrt(3)], [-1.0, 0.2]])  # cosines 1, 0.5, negative
    assert clip_score(images, texts) == pytest.approx((100 + 50 + 0) / 3)
    assert clip_score(images, texts, scale=2.5) == pytest.approx((2.5 + 1.25 + 0) / 3)
    with pytest.raises(ValueError):
        clip_score(images, texts[:2])


def test_retrieval_recall_metric_ranks_the_whole_set_whatever_the_batches():
    """The Ignite metric gathers every batch and equals Recall@K of the whole set, not a mean of per-batch figures."""
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(12, 8, generator=generator), torch.randn(12, 8, generator=generator)
    texts[:6] = images[:6] + 0.1 * texts[:6]  # half the pairs match
    captions = [f"caption {i % 10}" for i in range(12)]  # two captions repeat
    expected = retrieval_recall_at_k(images, texts, (3,), captions)
    for direction in ("text_to_image", "image_to_text"):
        figures = set()
        for batch in (1, 5, 12):
            metric = RetrievalRecall(k=3, direction=direction)
            for start in range(0, 12, batch):
                metric.update(
                    (images[start : start + batch], texts[start : start + batch], captions[start : start + batch])
                )
            figures.add(metric.compute())
            metric.reset()
            with pytest.raises(RuntimeError, match="at least one update"):
                metric.compute()
        assert figures == {expected[f"{direction}_R@3"]}
    per_batch_mean = (
        sum(
            retrieval_recall_at_k(images[i : i + 4], texts[i : i + 4], (3,), captions[i : i + 4])["text_to_image_R@3"]
            for i in (0, 4, 8)
        )
        / 3
    )
    assert per_batch_mean != expected["text_to_image_R@3"], "the check above would not tell the two apart"


def test_retrieval_recall_metric_refuses_bad_arguments():
    with pytest.raises(ValueError, match="direction"):
        RetrievalRecall(direction="both")
    with pytest.raises(ValueError, match="K >= 1"):
        RetrievalRecall(k=0)
    with pytest.raises(ValueError, match="one caption per embedding"):
        RetrievalRecall().update((torch.zeros(2, 4), torch.zeros(2, 4), "one caption"))
