"""The one subject split of the project: phantoms and real-data preparation divide subjects the same way.

Kept free of MONAI imports so that the data-preparation command lines start quickly.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


def _count(fraction: float, n: int) -> int:
    # round half up (2.5 -> 3), whatever Python's round does, and at least one subject for a non-zero fraction
    return 0 if fraction == 0 else max(1, math.floor(fraction * n + 0.5))


def split_subjects(
    subjects: Sequence[Hashable], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, list]:
    """Split subject ids into ``training`` / ``validation`` / ``test`` (each sorted), deterministically from ``seed``.

    The one split of the project (phantoms and real-data preparation alike): the sorted ids are permuted by a
    generator seeded with ``seed``; the first ``round(test_fraction * n)`` go to test, the next
    ``round(val_fraction * n)`` to validation (halves rounded up), the rest to training. A non-zero fraction
    gets at least one subject as long as one training subject remains; validation gives way first.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    ids = sorted(set(subjects))
    n = len(ids)
    n_test, n_val = _count(test_fraction, n), _count(val_fraction, n)
    while n_test + n_val > max(n - 1, 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 2**31 - 1])).permutation(n)
    shuffled = [ids[i] for i in order]
    return {
        "training": sorted(shuffled[n_test + n_val :]),
        "validation": sorted(shuffled[n_test : n_test + n_val]),
        "test": sorted(shuffled[:n_test]),
    }


def split_generated_subjects(
    count: int, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, noun: str = "subjects"
) -> dict[str, list[int]]:
    """:func:`split_subjects` of the generated subjects (or patients) ``0..count-1``, each split asked for non-empty.

    Raises ``ValueError`` before anything is generated when a split asked for (a non-zero fraction, and training
    always) would be empty: a data set without a test split cannot be evaluated.
    """
    splits = split_subjects(range(count), val_fraction, test_fraction, seed)
    wanted = {"training": 1.0, "validation": val_fraction, "test": test_fraction}
    if empty := [name for name, ids in splits.items() if not ids and wanted[name] > 0]:
        raise ValueError(
            f"{count} {noun} leave none for {', '.join(empty)} with val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}: make more {noun}."
        )
    return splits
