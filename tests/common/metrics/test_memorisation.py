"""common.metrics.memorisation: nearest-training-neighbour similarity of samples against test images'."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.metrics.memorisation import memorisation_report, nearest_neighbour_similarity, nearest_neighbours


def gaussian_sets(seed: int = 0, dim: int = 32, train: int = 300, test: int = 200, fresh: int = 100):
    """Training, test and fresh "generated" embeddings, all drawn from one distribution."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, dim)) for n in (train, test, fresh))


def test_nearest_neighbour_cosine_and_index():
    references = np.eye(4)
    queries = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [-1.0, 0.0, 0.0, 0.0]])
    similarity, index = nearest_neighbours(queries, references)
    np.testing.assert_allclose(similarity, [1 / np.sqrt(2), 1.0, 0.0])
    np.testing.assert_array_equal(index, [0, 3, 1])  # a tie goes to the lowest index
    assert similarity.shape == (3,) and similarity.dtype == np.float64


def test_chunks_images_and_tensors_agree():
    rng = np.random.default_rng(1)
    queries, references = rng.uniform(size=(23, 1, 6, 5)), rng.uniform(size=(17, 1, 6, 5))
    full = nearest_neighbour_similarity(queries.reshape(23, -1), references.reshape(17, -1))
    for chunk in (1, 4, 100):
        np.testing.assert_allclose(nearest_neighbour_similarity(queries, references, chunk_size=chunk), full)
    tensors = nearest_neighbour_similarity(torch.from_numpy(queries).float(), torch.from_numpy(references).float())
    np.testing.assert_allclose(tensors, full, atol=1e-6)


def test_centering_removes_a_common_offset():
    train, test, _ = gaussian_sets(dim=16, train=50, test=20)
    offset = 50.0 * np.ones(16)
    raw = nearest_neighbour_similarity(test + offset, train + offset)
    assert raw.min() > 0.99  # the common offset dominates every cosine
    np.testing.assert_allclose(
        nearest_neighbour_similarity(test + offset, train + offset, center=True),
        nearest_neighbour_similarity(test, train, center=True),
    )


def test_copies_of_training_samples_are_flagged():
    train, test, _ = gaussian_sets()
    copies = train[::6] * 2.0  # scaled copies: cosine 1 to their source
    report = memorisation_report(copies, train, test)
    assert report["fraction_above_test_p95"] == 1.0 and report["fraction_above_test_p99"] == 1.0
    assert report["generated"]["median"] == pytest.approx(1.0)
    np.testing.assert_array_equal(report["generated_train_index"], np.arange(0, 300, 6))
    assert report["test"]["p95"] < 0.9


def test_fresh_samples_are_not_flagged():
    train, test, fresh = gaussian_sets()
    report = memorisation_report(fresh, train, test)
    assert report["fraction_above_test_p95"] < 0.15 and report["fraction_above_test_p99"] < 0.06
    assert report["test_fraction_above_p95"] == pytest.approx(0.05, abs=0.01)
    assert abs(report["generated"]["median"] - report["test"]["median"]) < 0.05


def test_report_top_k_shapes_and_json():
    train, test, fresh = gaussian_sets(fresh=40)
    generated = np.concatenate([fresh, train[[5, 7, 11]] + 1e-3])  # 3 near-copies at indices 40, 41, 42
    report = memorisation_report(torch.from_numpy(generated), train, test, top_k=5)
    assert sorted(item["index"] for item in report["top_k"][:3]) == [40, 41, 42]
    assert {item["train_index"] for item in report["top_k"][:3]} == {5, 7, 11}
    assert len(report["top_k"]) == 5
    sims = [item["similarity"] for item in report["top_k"]]
    assert sims == sorted(sims, reverse=True)
    assert report["fraction_above_test_p95"] == pytest.approx(3 / 43, abs=0.1)
    assert (report["num_generated"], report["num_train"], report["num_test"]) == (43, 300, 200)
    assert len(report["generated_similarity"]) == 43 and len(report["test_similarity"]) == 200
    assert len(memorisation_report(generated, train, test, top_k=100)["top_k"]) == 43
    json.dumps(report)


def test_validation_errors():
    train, test, fresh = gaussian_sets(train=10, test=5, fresh=4)
    with pytest.raises(ValueError, match="same feature size"):
        nearest_neighbour_similarity(fresh[:, :5], train)
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbour_similarity(np.zeros((0, 32)), train)
    with pytest.raises(ValueError, match="embeddings"):
        nearest_neighbour_similarity(np.ones(32), train)
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbour_similarity(np.full((2, 32), np.nan), train)
    with pytest.raises(ValueError, match="zero norm"):
        nearest_neighbour_similarity(np.zeros((2, 32)), train)
    with pytest.raises(ValueError, match="real numbers"):
        nearest_neighbour_similarity(np.array([["a"]]), train)
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_neighbour_similarity(fresh, train, chunk_size=0)
    with pytest.raises(ValueError, match="top_k"):
        memorisation_report(fresh, train, test, top_k=-1)
    with pytest.raises(ValueError, match="test_emb"):
        memorisation_report(fresh, train, test[:, :3])
