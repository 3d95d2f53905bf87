"""tools/supervised_translation_baseline.py: a supervised U-Net reference for the ControlNet, on tiny phantoms."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.data.brain.phantoms import PhantomGeometry, write_phantom_dataset
from tests.helpers import REPO_ROOT
from tools.supervised_translation_baseline import supervised_translation_baseline

SMALL = {"channels": (8, 16), "batch_size": 4, "progress": False, "num_threads": 1}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, num_subjects=10, geometry=PhantomGeometry.demo(num_slices=1), seed=2, progress=False)
    return out


def test_training_learns_the_translation_and_the_result_is_written(phantoms, tmp_path):
    first = supervised_translation_baseline(str(phantoms), epochs=1, **SMALL)
    result = supervised_translation_baseline(str(phantoms), output=str(tmp_path / "r" / "b.json"), epochs=25, **SMALL)
    assert result["metrics"]["psnr"]["mean"] > first["metrics"]["psnr"]["mean"] + 3
    written = json.loads((tmp_path / "r" / "b.json").read_text())
    assert written == result and written["split"] == "validation" and written["num_slices"] == 1
    assert set(written["metrics"]) == {"psnr", "mae", "ms_ssim"}
    assert written["settings"]["training_pairs"] == 8 and written["settings"]["mirror_augmentation"] is True
    test = supervised_translation_baseline(
        str(phantoms), eval_split="test", epochs=1, mirror_augmentation=False, **SMALL
    )
    assert test["split"] == "test" and test["settings"]["mirror_augmentation"] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_split": "training"}, "eval_split must be 'validation' or 'test'"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"mirror_augmentation": "yes"}, "mirror_augmentation must be True or False"),
        ({"condition_key": "t2"}, "t2"),
    ],
)
def test_bad_arguments_stop_before_training(phantoms, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        supervised_translation_baseline(str(phantoms), output=str(tmp_path / "b.json"), **{**SMALL, **kwargs})
    assert not (tmp_path / "b.json").exists()


def test_the_command_line_ends_a_bad_argument_with_one_line(phantoms, tmp_path):
    result = subprocess.run(
        [sys.executable, "tools/supervised_translation_baseline.py", "--dataset_dir", str(phantoms)]
        + ["--eval_split", "training", "--output", str(tmp_path / "b.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "supervised-translation-baseline: error: eval_split must be 'validation' or 'test', got 'training'"
    )
    assert not (tmp_path / "b.json").exists()
