"""common.data.datalists: reading datalists, with errors that say how to make the data."""

from __future__ import annotations

import json

import pytest

from common.data.datalists import load_datalist


def test_missing_datalist_says_how_to_make_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="run make-data"):
        load_datalist(str(tmp_path), "training", how_to_get="run make-data")


def test_unpaired_entries_name_the_missing_key(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"has no \['flair'\].*pair them like this"):
        load_datalist(str(tmp_path), "training", required_keys=["image", "flair"], how_to_get="pair them like this")


def test_image_key_reads_another_column_as_the_image(tmp_path):
    entries = [{"image": "t1.nii.gz", "flair": "flair.nii.gz"}]
    for name in entries[0].values():
        (tmp_path / name).touch()  # MONAI makes the paths of existing files absolute
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    (item,) = load_datalist(str(tmp_path), "training", image_key="flair")
    assert item["image"] == item["flair"] == str(tmp_path / "flair.nii.gz")
    with pytest.raises(ValueError, match="has no 'pd' to use as the image"):
        load_datalist(str(tmp_path), "training", image_key="pd")
