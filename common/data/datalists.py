"""Reading MONAI datalists with errors that say how to make the data."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

DATA_HINT = (
    "Make or prepare a data set with the tools named in the bundle's docs/README.md, then pass `--dataset_dir DIR`."
)


def load_datalist(
    dataset_dir: str,
    key: str,
    filename: str = "datalist.json",
    limit: int | None = None,
    required_keys: Sequence[str] = (),
    how_to_get: str = DATA_HINT,
) -> list[dict[str, Any]]:
    """Entries of split ``key`` of ``dataset_dir/filename`` with paths made absolute; ``limit`` keeps the first N.

    ``required_keys`` (e.g. ``["image", "condition"]`` for paired data) must be present in every entry.
    ``how_to_get`` ends every error: how to make or prepare the data this bundle needs.
    """
    path = Path(dataset_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"No datalist at {path}. {how_to_get}")
    try:
        items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=key, base_dir=str(path.parent))
    except ValueError as err:
        raise ValueError(f"{path} has no '{key}' split: {err}. {how_to_get}") from err
    if not items:
        raise ValueError(f"The '{key}' split of {path} is empty. {how_to_get}")
    for i, item in enumerate(items):
        if missing := [k for k in required_keys if k not in item]:
            raise ValueError(
                f"Entry {i} of the '{key}' split of {path} has no {missing}: this bundle needs paired data "
                f"({', '.join(required_keys)}). {how_to_get}"
            )
    return items[:limit] if limit else items


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
