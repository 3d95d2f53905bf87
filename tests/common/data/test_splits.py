"""common.data.splits: the one subject split of the project."""

from __future__ import annotations

import json

import pytest

from common.data.brain.phantoms import PhantomGeometry, write_phantom_dataset
from common.data.splits import split_subjects


def test_split_by_subject_is_deterministic():
    ids = [f"s{i:02d}" for i in range(10)]
    a = split_subjects(ids, 0.2, 0.1, seed=3)
    assert a == split_subjects(list(reversed(ids)), 0.2, 0.1, seed=3)  # discovery order does not matter
    assert [len(a[k]) for k in ("training", "validation", "test")] == [7, 2, 1]
    assert sorted(sum(a.values(), [])) == ids
    assert any(split_subjects(ids, 0.2, 0.1, seed=s) != a for s in range(4, 10))
    two = split_subjects(["a", "b"], 0.1, 0.1)  # one training subject always remains
    assert [len(two[k]) for k in ("training", "validation", "test")] == [1, 0, 1]
    assert split_subjects(["a"], 0.3, 0.3)["training"] == ["a"]
    with pytest.raises(ValueError, match="val_fraction"):
        split_subjects(ids, 1.0, 0.0)
    with pytest.raises(ValueError, match="< 1"):
        split_subjects(ids, 0.6, 0.5)


def test_halves_round_up():
    """25 subjects at 10%: 2.5 rounds to 3 (phantoms and real-data preparation once disagreed: 2 and 3)."""
    counts = {k: len(v) for k, v in split_subjects(range(25), 0.1, 0.1).items()}
    assert counts == {"training": 19, "validation": 3, "test": 3}


def test_phantoms_use_the_same_split(tmp_path):
    write_phantom_dataset(tmp_path, num_subjects=5, geometry=PhantomGeometry.demo(num_slices=1), seed=4, progress=False)
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    expected = split_subjects(range(5), 0.1, 0.1, seed=4)
    for split, indices in expected.items():
        assert sorted({item["subject"] for item in datalist[split]}) == [f"sub-{i:04d}" for i in indices]


def test_generated_subjects_must_fill_every_split_asked_for():
    from common.data.splits import split_generated_subjects

    assert split_generated_subjects(10, 0.1, 0.1, seed=0) == split_subjects(range(10), 0.1, 0.1, seed=0)
    with pytest.raises(ValueError, match="2 patients leave none for validation.*make more patients"):
        split_generated_subjects(2, 0.1, 0.1, seed=0, noun="patients")
    assert split_generated_subjects(2, 0.0, 0.1, seed=0)["validation"] == []  # not asked for: fine
