"""Reading MONAI datalists with errors that say how to make the data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    image_key: str = "image",
) -> list[dict[str, Any]]:
    """Entries of split ``key`` of ``dataset_dir/filename`` with paths made absolute; ``limit`` keeps the first N.

    ``required_keys`` (e.g. ``["image", "condition"]`` for paired data) must be present in every entry.
    ``how_to_get`` ends every error: how to make or prepare the data this bundle needs.
    ``image_key`` names the entry key whose file is used as ``"image"`` (e.g. ``"flair"`` of the brain phantoms, to
    train or evaluate on their FLAIR slices); the entry's own ``"image"`` is then replaced.
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
        if image_key != "image":
            if image_key not in item:
                raise ValueError(
                    f"Entry {i} of the '{key}' split of {path} has no '{image_key}' to use as the image; its keys are "
                    f"{sorted(item)}."
                )
            item["image"] = item[image_key]
        if missing := [k for k in required_keys if k not in item]:
            raise ValueError(
                f"Entry {i} of the '{key}' split of {path} has no {missing}: this bundle needs paired data "
                f"({', '.join(required_keys)}). {how_to_get}"
            )
    return items[:limit] if limit else items
