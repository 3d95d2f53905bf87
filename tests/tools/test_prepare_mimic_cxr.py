"""prepare-mimic-cxr: the command line over common.data.cxr.mimic, on the fake MIMIC tree of its library tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.common.data.cxr.test_mimic import KEPT, write_fake_mimic
from tests.helpers import REPO_ROOT
from tools.prepare_mimic_cxr import cli


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return write_fake_mimic(tmp_path_factory.mktemp("mimic") / "2.1.0")


def _run(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["prepare-mimic-cxr", *args])
    cli()


def test_cli_prepares_then_resumes(mimic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ("--root", str(mimic), "--output_dir", str(out), "--size", "64", "--progress", "False")
    _run(monkeypatch, *args)
    printed = capsys.readouterr().out
    assert "kept 6 PA images of 6 studies and 5 patients (training 4, validation 1, test 1)" in printed
    assert "view LATERAL: 1 images (1 studies); view AP: 1 images (1 studies)" in printed
    assert "report has neither findings nor impression: 1 images" in printed
    assert "wrote 6 images" in printed and f"datalist: {out / 'datalist.json'}" in printed
    datalist = json.loads((out / "datalist.json").read_text())
    assert {e["dicom_id"] for split in ("training", "validation", "test") for e in datalist[split]} == KEPT
    _run(monkeypatch, *args)
    printed = capsys.readouterr().out
    assert "wrote 0 images in" in printed and "6 already there" in printed


def test_cli_reports_a_missing_csv(tmp_path, monkeypatch, capsys):
    root = tmp_path / "mimic"
    root.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        _run(monkeypatch, "--root", str(root), "--output_dir", str(tmp_path / "out"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mimic-cxr-2.0.0-metadata.csv(.gz) not found in")
    assert "PhysioNet" in err and "https://physionet.org/content/mimic-cxr-jpg/" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_unknown_split(mimic, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(monkeypatch, "--root", str(mimic), "--output_dir", str(tmp_path / "out"), "--split", "stratified")
    assert exit_info.value.code == 2
    assert "unknown split 'stratified'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_script_runs_as_a_program(mimic, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "tools/prepare_mimic_cxr.py", "--root", str(mimic), "--output_dir", str(out)]
    command += ["--size", "32", "--limit", "2", "--split", "random", "--chexpert_csv", "none", "--progress", "False"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "kept 2 PA images" in done.stdout
    datalist = json.loads((out / "datalist.json").read_text())
    entries = [e for split in ("training", "validation", "test") for e in datalist[split]]
    assert len(entries) == 2 and all("labels" not in e for e in entries)
    assert datalist["image_size"] == [32, 32] and datalist["preparation"]["split"] == "random"
    assert datalist["source"]["chexpert_csv"] is None
