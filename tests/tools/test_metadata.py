"""tools.release.metadata: offline metadata validation against the project's copy of the zoo schema rules."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT
from tools.release.metadata import (
    SCHEMA_PATH,
    ZOO_SCHEMA_URL,
    check_metadata,
    load_schema,
    validate_metadata,
)


def _image(**extra):
    spec = {
        "type": "image",
        "format": "magnitude",
        "modality": "MR",
        "num_channels": 1,
        "spatial_shape": [160, 224],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": False,
        "channel_def": {"0": "T1w"},
    }
    spec.update(extra)
    return spec


VALID = {
    "schema": ZOO_SCHEMA_URL,
    "version": "0.1.0",
    "changelog": {"0.1.0": "initial release"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.4.6",
    "required_packages_version": {"nibabel": "5.4.2", "transformers": "4.50.0"},
    "task": "Prompt-conditioned brain T1w slice synthesis",
    "description": "Latent diffusion model of 2D brain T1w slices.",
    "authors": "Project authors",
    "copyright": "Copyright (c) the authors",
    "eval_metrics": {"fid": 2.2, "ms_ssim": 0.5368},
    "references": ["Pinaya et al., Generative AI for medical imaging: extending the MONAI framework, 2023"],
    "network_data_format": {
        "inputs": {
            "prompt": {
                "type": "string",
                "format": "text",
                "num_channels": 0,
                "spatial_shape": [],
                "dtype": "str",
                "value_range": [],
            },
            "condition": _image(modality="MR", channel_def={"0": "FLAIR"}),
        },
        "outputs": {"pred": _image()},
    },
}


@pytest.fixture
def meta_file(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(VALID, indent=4))
    return path


def test_schema_file_is_valid_draft():
    schema = load_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    assert SCHEMA_PATH.is_file()


def test_valid_metadata_passes(meta_file):
    assert validate_metadata(VALID) == []
    assert validate_metadata(meta_file) == []
    check_metadata(meta_file)


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_monai_verify_metadata_offline_with_local_schema(meta_file, tmp_path):
    from monai.bundle import verify_metadata

    # an existing file at `filepath` is not downloaded again: MONAI's own verifier runs offline
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA_PATH))
    bad = copy.deepcopy(VALID)
    del bad["network_data_format"]["inputs"]["condition"]["value_range"]
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(bad_file), filepath=str(SCHEMA_PATH))


def test_missing_tensor_field_is_named(meta_file):
    bad = copy.deepcopy(VALID)
    del bad["network_data_format"]["inputs"]["condition"]["value_range"]
    del bad["network_data_format"]["inputs"]["prompt"]["dtype"]
    problems = validate_metadata(bad)
    assert "network_data_format.inputs.condition.value_range: required field is missing" in problems
    assert "network_data_format.inputs.prompt.dtype: required field is missing" in problems
    assert len(problems) == 2
    meta_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"inputs\.condition\.value_range"):
        check_metadata(meta_file)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.pop("numpy_version"), "numpy_version: required field is missing"),
        (lambda m: m.pop("network_data_format"), "network_data_format: required field is missing"),
        (lambda m: m.update(authors=["a", "b"]), "authors: ['a', 'b'] is not of type 'string'"),
        (lambda m: m["network_data_format"].pop("outputs"), "network_data_format.outputs: required field is missing"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels="1"), "outputs.pred.num_channels"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].update(value_range=["0", 1]), "value_range[0]"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].update(spatial_shape=[]), "outputs.pred.spatial_shape"),
        (lambda m: m["network_data_format"]["inputs"].update(prompt="a brain"), "inputs.prompt: 'a brain'"),
        (lambda m: m.update(version="1"), "version: '1' does not match"),
        (lambda m: m.update(eval_metrics={"fid": "2.2"}), "eval_metrics.fid: '2.2' is not a number"),
        (lambda m: m.update(eval_metrics={"fid": float("nan")}), "eval_metrics.fid: nan is not finite"),
        (lambda m: m.update(eval_metrics={"ok": True}), "eval_metrics.ok: True is not a number"),
        (lambda m: m.update(schema="https://x/meta_schema_20220324.json"), "schema: "),
        (lambda m: m.update(changelog={"0.1.0": 1}), 'changelog["0.1.0"]: 1 is not of type'),
    ],
)
def test_invalid_metadata_names_the_field(edit, expected):
    bad = copy.deepcopy(VALID)
    edit(bad)
    problems = validate_metadata(bad)
    assert any(expected in p for p in problems), problems


def test_version_missing_from_changelog():
    bad = copy.deepcopy(VALID)
    bad["version"] = "0.2.0"
    problems = validate_metadata(bad)
    assert problems == ["changelog: has no entry for version '0.2.0' (entries: ['0.1.0'])"]
    del bad["changelog"]
    assert validate_metadata(bad) == ["changelog: missing; it must have an entry for version '0.2.0'"]
    with pytest.raises(ValueError, match="changelog"):
        check_metadata(bad)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        validate_metadata(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    assert "not valid JSON" in validate_metadata(broken)[0]
    dup = tmp_path / "dup.json"
    text = json.dumps(VALID)
    dup.write_text(text.replace('"task":', '"task": "first", "task":', 1))
    assert validate_metadata(dup) == ["task: key appears more than once (JSON keeps only the last)"]


def test_cli_reports_problems(meta_file, tmp_path):
    bad = copy.deepcopy(VALID)
    del bad["task"]
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(bad))
    cmd = [sys.executable, "-m", "tools.release.metadata"]
    ok = subprocess.run([*cmd, str(meta_file)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    res = subprocess.run([*cmd, str(meta_file), str(bad_file)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 1
    assert "task: required field is missing" in res.stdout
