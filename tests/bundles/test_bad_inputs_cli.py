"""Bad input through the real command line: every probe exits non-zero, writes nothing, and says what is wrong last.

Each probe runs ``python -m monai.bundle run`` from the bundle's folder, as a user does, against every bundle's
inference, evaluation and training configs. The last line of the output must name the option (or the problem) and
no output, run folder or bundle file may be written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.brain.phantoms import PhantomGeometry, write_phantom_dataset
from tests.helpers import REPO_ROOT
from tests.helpers.bundle_runs import bundle_env, snapshot

pytestmark = pytest.mark.bundle

BRAIN = REPO_ROOT / "bundles" / "brain_t1_ldm"
CONTROLNET = REPO_ROOT / "bundles" / "flair_to_t1_controlnet"
INFER, EVALUATE = "configs/inference.json", "['configs/inference.json','configs/evaluate.json']"
TRAIN_AE = "configs/train_autoencoder.json"
TRAIN_LDM = "['configs/train_autoencoder.json','configs/train_diffusion.json']"
TRAIN_CN = "configs/train_controlnet.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny phantom data set, a file where a folder is expected, and a FLAIR slice at 1 mm."""
    root = tmp_path_factory.mktemp("bad_inputs")
    write_phantom_dataset(root / "phantoms", 3, PhantomGeometry.demo(num_slices=1), seed=0, progress=False)
    (root / "a_file").write_text("not a folder")
    flair = nib.load(CONTROLNET / "examples" / "sub-0011_slice-2_FLAIR.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(flair.dataobj), np.eye(4)), str(root / "flair_1mm.nii.gz"))
    return {"phantoms": root / "phantoms", "file": root / "a_file", "flair_1mm": root / "flair_1mm.nii.gz"}


@pytest.fixture(scope="module", autouse=True)
def bundles_unchanged():
    """No probe may change a file of a bundle (weights, docs, metadata)."""
    before = {b: snapshot(b) for b in (BRAIN, CONTROLNET)}
    yield
    assert {b: snapshot(b) for b in (BRAIN, CONTROLNET)} == before


def _run(bundle: Path, config: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config]
    cmd += ["--output_dir", str(tmp_path / "out")] if "train" not in config else ["--run_dir", str(tmp_path / "run")]
    return subprocess.run(cmd + args, cwd=bundle, env=bundle_env(), capture_output=True, text=True, timeout=300)


def _last_line(done: subprocess.CompletedProcess) -> str:
    return [line for line in done.stderr.splitlines() if line.strip()][-1]


PROBES = [
    # (id, bundle, config, args, what the last line says)
    ("misspelt-prompt", BRAIN, INFER, ["--promt", "x"], "--promt: no such option in configs/inference.json."),
    ("nan-text", BRAIN, INFER, ["--guidance_scale", "nan"], "--guidance_scale nan: the command line read it"),
    ("inf", BRAIN, INFER, ["--guidance_scale", "1e999"], "--guidance_scale inf: inf is not a finite number"),
    ("seed-text", BRAIN, INFER, ["--seed", "abc"], "--seed abc: the command line read it as the text 'abc'"),
    ("amp-lowercase", BRAIN, INFER, ["--amp", "true"], "--amp true: the command line read it as the text"),
    ("other-bundle-option", BRAIN, INFER, ["--conditioning_scale", "2"], "--conditioning_scale: no such option"),
    ("zero-steps", BRAIN, INFER, ["--num_inference_steps", "0"], "--num_inference_steps 0: not allowed"),
    ("unknown-scheduler", BRAIN, INFER, ["--scheduler", "euler"], "--scheduler euler: not allowed. Give one of"),
    ("no-gpu", BRAIN, INFER, ["--device", "cuda:0"], "--device cuda:0: this machine has 0 CUDA device(s)"),
    ("empty-prompt", BRAIN, INFER, ["--prompt", ""], "error: `prompt` is empty"),
    ("missing-weights", BRAIN, INFER, ["--diffusion_path", "/nonexistent/d.pt"], "/nonexistent/d.pt"),
    ("output-is-a-file", BRAIN, INFER, ["--output_dir", "{file}"], "is a file: give --output_dir a folder"),
    ("publish-yes", BRAIN, EVALUATE, ["--publish", "yes"], "--publish yes: the command line read it as the text 'yes'"),
    ("eval-option-alone", BRAIN, INFER, ["--eval_num_samples", "3"], "It belongs to configs/evaluate.json"),
    ("zero-epochs", BRAIN, TRAIN_AE, ["--dataset_dir", "{phantoms}", "--ae_max_epochs", "0"], "--ae_max_epochs 0"),
    ("misspelt-batch", BRAIN, TRAIN_AE, ["--ae_batch_sise", "2"], "Did you mean --ae_batch_size"),
    ("negative-lr", BRAIN, TRAIN_LDM, ["--ldm_learning_rate", "-1"], "--ldm_learning_rate -1: not allowed"),
    ("no-dataset", BRAIN, TRAIN_AE, ["--dataset_dir", "/nope"], "--dataset_dir /nope: /nope is not an existing folder"),
    ("misspelt-input", CONTROLNET, INFER, ["--input_imag", "my.png"], "Did you mean --input_image?"),
    ("num-samples", CONTROLNET, INFER, ["--num_samples", "2"], "--num_samples: no such option"),
    ("nan-conditioning", CONTROLNET, INFER, ["--conditioning_scale", "nan"], "--conditioning_scale nan"),
    ("missing-input", CONTROLNET, INFER, ["--input_image", "/nope.nii.gz"], "/nope.nii.gz is not an existing file"),
    ("input-at-1mm", CONTROLNET, INFER, ["--input_image", "{flair_1mm}"], "voxels of 1.00 x 1.00 mm, but the model"),
    ("no-base-model", CONTROLNET, INFER, ["--base_model_dir", "/nope"], "/nope is not an existing folder"),
    ("eval-split", CONTROLNET, EVALUATE, ["--eval_split", "train"], "--eval_split train: not allowed"),
    ("val-interval-text", CONTROLNET, TRAIN_CN, ["--val_interval", "abc"], "--val_interval abc"),
]


@pytest.mark.parametrize(("bundle", "config", "args", "expected"), [p[1:] for p in PROBES], ids=[p[0] for p in PROBES])
def test_bad_input_exits_nonzero_writes_nothing_and_says_why_last(bundle, config, args, expected, data, tmp_path):
    args = [a.format(**data) for a in args]
    done = _run(bundle, config, args, tmp_path)
    assert done.returncode != 0, done.stdout[-2000:]
    assert expected in _last_line(done), done.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_the_same_request_twice_is_refused_before_sampling_unless_overwrite(tmp_path):
    args = ["--num_samples", "1", "--num_inference_steps", "2"]
    assert _run(BRAIN, INFER, args, tmp_path).returncode == 0
    written = snapshot(tmp_path / "out")
    again = _run(BRAIN, INFER, args, tmp_path)
    assert again.returncode != 0 and "exist already" in _last_line(again) and "--overwrite True" in _last_line(again)
    assert "sampling" not in again.stderr, "refused before any sampling"
    assert snapshot(tmp_path / "out") == written
    assert _run(BRAIN, INFER, [*args, "--overwrite", "True"], tmp_path).returncode == 0
    assert snapshot(tmp_path / "out") == written  # same request, same bytes
