"""tools/prepare_brain_cohorts.py: the command line on the small cohort trees of tests/common/data/brain/test_cohorts.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.common.data.brain.test_cohorts import IXI_HEADER, IXI_ROWS, make_hcp, make_ixi, make_oasis, write_csv
from tests.helpers import REPO_ROOT
from tools.prepare_brain_cohorts import main

SMALL_ARGS = ["--grid_shape", "24,28,20", "--target_shape", "20,24", "--num_slices", "3", "--progress=False"]


def test_cli_prepares_hcp(tmp_path):
    input_dir, table = make_hcp(tmp_path)
    out = tmp_path / "out"
    tool = [sys.executable, str(REPO_ROOT / "tools" / "prepare_brain_cohorts.py")]
    args = ["--cohort", "hcp", "--input_dir", str(input_dir), "--demographics", str(table), "--output_dir", str(out)]
    res = subprocess.run([*tool, *args, *SMALL_ARGS, "--planes", "axial,coronal"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "wrote 24 slices of 4 subjects (training 2, validation 1, test 1)" in res.stdout
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["preparation"]["planes"] == ["axial", "coronal"]
    assert datalist["preparation"]["template"]["shape"] == [24, 28, 20]
    assert {e["facts"]["age_range"] for e in datalist["training"]} <= {"22-25", "26-30", "31-35", "36+"}


def test_cli_reports_left_out_subjects(tmp_path, capsys):
    disc, table = make_oasis(tmp_path)
    args = ["oasis1", str(disc), str(table), str(tmp_path / "out")]
    main(*args, grid_shape=(24, 28, 20), target_shape=(20, 24), num_slices=3, progress=False)
    printed = capsys.readouterr().out
    assert "wrote 9 slices of 3 subjects" in printed
    assert "left out: 1 repeat session(s), 1 not healthy (CDR above 0)" in printed


@pytest.mark.parametrize("problem", ["missing_column", "off_grid", "rerun"])
def test_cli_errors_exit_2_with_the_fix(tmp_path, capsys, problem):
    input_dir, table = make_ixi(tmp_path)
    out = tmp_path / "out"
    kwargs = {"t1_pattern": "{subject}_T1_mni_brain.nii.gz", "target_shape": (20, 24), "progress": False}
    kwargs["grid_shape"] = (24, 28, 30) if problem == "off_grid" else (24, 28, 20)
    if problem == "missing_column":
        table = write_csv(tmp_path / "no_sex.csv", [IXI_HEADER[0], IXI_HEADER[4]], [[r[0], r[4]] for r in IXI_ROWS])
    if problem == "rerun":
        main("ixi", str(input_dir), str(table), str(out), **kwargs)
    with pytest.raises(SystemExit) as stop:
        main("ixi", str(input_dir), str(table), str(out), **kwargs)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    expected = {
        "missing_column": "no column 'SEX_ID (1=m, 2=f)'",
        "off_grid": "field of view 24 x 28 x 20 mm, expected 24 x 28 x 30 mm",
        "rerun": "pass --overwrite",
    }[problem]
    assert error.startswith("error: ") and expected in error
    if problem != "rerun":
        assert not out.exists()
