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
