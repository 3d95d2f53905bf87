"""common.io.atomic: outputs are written to a temporary name and renamed."""

from __future__ import annotations

import json

import pytest

from common.io.atomic import atomic_path, write_json


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        assert tmp.name == "file.txt" and tmp.parent != target.parent
        tmp.write_text("new")
        assert not target.exists()  # nothing at the final name until the block succeeds
    assert target.read_text() == "new"

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("writer crashed")
    assert target.read_text() == "new"  # the previous file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_write_json(tmp_path):
    write_json(tmp_path / "a.json", {"prompt": "x", "seed": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"prompt": "x", "seed": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_output_dir_checked_before_any_work(tmp_path):
    from common.io.atomic import check_output_dir

    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists(), "checking creates nothing"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="which is a file"):
        check_output_dir(tmp_path / "file.txt" / "out")
