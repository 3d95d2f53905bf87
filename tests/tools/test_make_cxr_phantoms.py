"""tools/make_cxr_phantoms.py: the command line that writes the chest X-ray phantom data set."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.data.cxr.datalist import ENTRY_KEYS, SPLITS
from tests.helpers import REPO_ROOT
from tools import make_cxr_phantoms as tool


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    out = str(tmp_path / "a")
    with pytest.raises(ValueError, match="unknown size"):
        tool.make_cxr_phantoms(output_dir=out, num_patients=3, size="huge")
    with pytest.raises(ValueError, match="num_patients"):
        tool.make_cxr_phantoms(output_dir=out, num_patients=2)
    with pytest.raises(ValueError, match="studies_per_patient"):
        tool.make_cxr_phantoms(output_dir=out, num_patients=3, studies_per_patient=0)
    with pytest.raises(ValueError, match="unknown prevalence"):
        tool.make_cxr_phantoms(output_dir=out, num_patients=3, prevalence={"fracture": 0.2})
    with pytest.raises(ValueError, match="val_fraction"):
        tool.make_cxr_phantoms(output_dir=out, num_patients=3, val_fraction=1.5)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        tool.make_cxr_phantoms(output_dir=str(full), num_patients=3)
    assert not (tmp_path / "a").exists() and sorted(p.name for p in full.iterdir()) == ["keep.txt"]


def test_script_reports_errors_with_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "tools/make_cxr_phantoms.py", "--output_dir", str(tmp_path / "b"), "--size", "huge"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "make_cxr_phantoms: error: unknown size 'huge'" in result.stderr
    assert not (tmp_path / "b").exists()


def test_writes_the_data_set_and_a_summary(tmp_path, capsys):
    out = tmp_path / "phantoms"
    datalist = tool.make_cxr_phantoms(
        output_dir=str(out), num_patients=3, size=40, studies_per_patient=2, seed=1, progress=False
    )
    summary = capsys.readouterr().out
    assert "wrote 6 chest X-ray phantoms (3 patients x 2 studies, 40x40)" in summary and " s; " in summary
    data = json.loads((out / "datalist.json").read_text())
    assert datalist == str(out / "datalist.json")
    assert len(list((out / "images").glob("*.png"))) == 6
    for split in SPLITS:
        assert len(data[split]) == 2  # one patient, two studies, in each split
        for entry in data[split]:
            assert set(ENTRY_KEYS) <= set(entry) and (out / entry["image"]).is_file()
    # --overwrite replaces the phantoms of a non-empty folder
    tool.make_cxr_phantoms(output_dir=str(out), num_patients=4, size=40, studies_per_patient=1, overwrite=True)
    assert json.loads((out / "datalist.json").read_text())["num_patients"] == 4
    assert len(list((out / "images").glob("*.png"))) == 4
