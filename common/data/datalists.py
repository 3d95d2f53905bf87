"""Reading MONAI datalists with errors that say how to make the data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

DATA_HINT = (
    "Make phantoms with `python tools/make_brain_phantoms.py --output_dir DIR` or prepare real data with "
    "`python tools/prepare_brain_mri.py --input_dir ... --output_dir DIR`, then pass `--dataset_dir DIR`."
)


def load_datalist(
    dataset_dir: str,
    key: str,
    filename: str = "datalist.json",
    limit: int | None = None,
    required_keys: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Entries of split ``key`` of ``dataset_dir/filename`` with paths made absolute; ``limit`` keeps the first N.

    ``required_keys`` (e.g. ``["image", "flair"]`` for paired data) must be present in every entry.
    """
    path = Path(dataset_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"No datalist at {path}. {DATA_HINT}")
    try:
        items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=key, base_dir=str(path.parent))
    except ValueError as err:
        raise ValueError(f"{path} has no '{key}' split: {err}. {DATA_HINT}") from err
    if not items:
        raise ValueError(f"The '{key}' split of {path} is empty. {DATA_HINT}")
    for i, item in enumerate(items):
        if missing := [k for k in required_keys if k not in item]:
            raise ValueError(
                f"Entry {i} of the '{key}' split of {path} has no {missing}: this bundle needs paired data "
                f"({', '.join(required_keys)}). Phantoms are paired; for real data use "
                "`tools/prepare_brain_mri.py --with_flair`."
            )
    return items[:limit] if limit else items
