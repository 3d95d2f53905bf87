"""common.evaluation.publishing: results reach a bundle's docs only when asked, with what produced them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from common.evaluation.publishing import (
    BundleDocs,
    check_publishable,
    run_provenance,
    update_eval_metrics,
    update_readme_section,
    weights_note,
)

METADATA = {"name": "x", "version": "0.1.0", "eval_metrics": {"fid": 2.2, "ms_ssim": 0.5368}, "task": "t"}


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    (tmp_path / "docs" / "README.md").write_text("a\n<!-- evaluation:start -->\nold\n<!-- evaluation:end -->\nb\n")
    return tmp_path


def test_update_eval_metrics_round_trip(bundle):
    meta_file = bundle / "configs" / "metadata.json"
    before = json.loads(meta_file.read_text())
    result = update_eval_metrics(meta_file, {"ms_ssim": np.float32(0.75), "psnr": 26.25}, ndigits=4)
    after = json.loads(meta_file.read_text())
    assert after == result
    assert list(after) == list(before)  # key order kept
    assert list(after["eval_metrics"].items()) == [("fid", 2.2), ("ms_ssim", 0.75), ("psnr", 26.25)]
    assert {k: v for k, v in after.items() if k != "eval_metrics"} == {
        k: v for k, v in before.items() if k != "eval_metrics"
    }
    update_eval_metrics(meta_file, {"mae": 0.0263}, replace=True)
    assert json.loads(meta_file.read_text())["eval_metrics"] == {"mae": 0.0263}
    assert [p.name for p in meta_file.parent.iterdir()] == ["metadata.json"]  # no temporary left


def test_update_eval_metrics_adds_key_and_rejects_bad_values(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps({"name": "x"}))
    update_eval_metrics(path, {"fid": 3})
    assert list(json.loads(path.read_text()))[-1] == "eval_metrics"
    original = path.read_text()
    for bad in ({"fid": float("inf")}, {"fid": "x"}, {"fid": True}, {"fid": None}):
        with pytest.raises(ValueError, match="fid"):
            update_eval_metrics(path, bad)
    assert path.read_text() == original


def test_readme_section_needs_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="evaluation:start"):
        update_readme_section(str(readme), "evaluation", "table\n")


def test_nothing_is_written_unless_publishing_is_asked(bundle):
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    drawn = []
    written = BundleDocs(bundle).publish({"metrics": {"fid": 1.0}}, {"fid": 1.0}, "table\n", drawn.append)
    assert not written and not drawn
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_publishing_writes_results_metrics_readme_and_figure(bundle):
    drawn = []
    docs = BundleDocs(bundle, enabled=True, figure="docs/figure.png")
    assert docs.publish({"metrics": {"fid": 1.5}}, {"fid": 1.5}, "| fid | 1.5 |\n", drawn.append)
    assert json.loads((bundle / "docs" / "evaluation_results.json").read_text()) == {"metrics": {"fid": 1.5}}
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]["fid"] == 1.5
    assert "| fid | 1.5 |" in (bundle / "docs" / "README.md").read_text()
    assert drawn == [bundle / "docs" / "figure.png"]


@pytest.mark.parametrize(
    ("complete", "enough", "message"),
    [(False, True, "whole test split"), (True, False, "at least 100 generated samples")],
)
def test_partial_runs_cannot_publish(complete, enough, message):
    check_publishable(False, complete=complete, enough_samples=enough)  # computing and logging is always fine
    with pytest.raises(ValueError, match=message):
        check_publishable(True, complete=complete, enough_samples=enough)
    check_publishable(True, complete=True, enough_samples=True)


def test_publish_flag_must_be_a_boolean():
    with pytest.raises(ValueError, match="True or False"):
        check_publishable("yes", complete=True)


def test_run_provenance_records_the_command_and_the_weights(tmp_path, monkeypatch):
    demo, trained = tmp_path / "demo.pt", tmp_path / "trained.pt"
    torch.save({"net": {}, "provenance": {"demo": True}}, demo)
    torch.save({"net": {}}, trained)
    monkeypatch.setattr(sys, "argv", ["/x/monai/bundle/__main__.py", "run", "--config_file", "['a.json','b.json']"])
    record = run_provenance({"a": demo, "b": trained})
    assert record["command"] == "python -m monai.bundle run --config_file \"['a.json','b.json']\""
    assert record["demo_weights"] is True
    assert record["weights"]["a"]["demo"] and not record["weights"]["b"]["demo"]
    assert len(record["weights"]["b"]["sha256"]) == 64
    assert run_provenance({"b": trained})["demo_weights"] is False
    assert "demo weights" in weights_note(record) and "weights" in weights_note(run_provenance({"b": trained}))
    with pytest.raises(FileNotFoundError):
        run_provenance({"c": tmp_path / "missing.pt"})
