"""End-to-end tests of the flair_to_t1_controlnet bundle configs on tiny phantom pairs (CPU).

The frozen base model is the shipped brain_t1_ldm demo model; ControlNets are trained for one tiny epoch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.brain.phantoms import PhantomGeometry, write_phantom_dataset
from common.io.weights import load_weights, state_fingerprint
from tests.helpers import REPO_ROOT
from tests.helpers.bundle_copy import copy_bundle
from tests.helpers.bundle_runs import bundle_env, error_text, kill_at_checkpoint, snapshot
from tests.helpers.bundle_runs import workflow as bundle_workflow

pytestmark = pytest.mark.bundle

REPO = REPO_ROOT
BUNDLE = REPO / "bundles" / "flair_to_t1_controlnet"
CONFIGS = BUNDLE / "configs"
BASE_MODELS = REPO / "bundles" / "brain_t1_ldm" / "models"
EXAMPLE = BUNDLE / "examples" / "sub-0011_slice-2_FLAIR.nii.gz"
PY = sys.executable

TINY = {
    "cn_max_epochs": 1,
    "cn_batch_size": 4,
    "num_workers": 0,
    "train_limit": 8,
    "val_limit": 2,
    "val_interval": 1,
    "val_num_inference_steps": 2,
}
FAST = {"num_inference_steps": 2, "progress": False}


def workflow(config, workflow_type, **overrides):
    return bundle_workflow(BUNDLE, config, workflow_type, **overrides)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, num_subjects=8, geometry=PhantomGeometry.demo(num_slices=2), seed=2, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    """One tiny epoch of ControlNet training through the shipped config; returns its models/ folder."""
    model_dir = tmp_path_factory.mktemp("models")
    run_dir = tmp_path_factory.mktemp("runs") / "controlnet"
    wf = workflow(
        "train_controlnet.json",
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(model_dir),
        run_dir=str(run_dir),
        install_weights=True,
        **TINY,
    )
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()
    weights = load_weights(model_dir / "controlnet.pt")
    assert set(weights) == {"controlnet", "base_model", "architectures", "provenance"}
    assert weights["architectures"]["controlnet"]["network"] == "ControlNet"
    base_unet = load_weights(BASE_MODELS / "diffusion_model.pt")["unet"]
    assert weights["base_model"]["unet_sha256"] == state_fingerprint(base_unet)
    checkpoint = torch.load(run_dir / "checkpoint_epoch=1.pt", weights_only=True)
    assert set(checkpoint["controlnet_ema"]) == set(weights["controlnet"])
    assert all(torch.equal(v, checkpoint["controlnet_ema"][k]) for k, v in weights["controlnet"].items()), (
        "the exported ControlNet is the moving average the checkpoint keeps beside the online weights"
    )
    assert any(run_dir.glob("events.out.tfevents*")), "TensorBoard scalars and images"
    return model_dir


def test_a_last_batch_of_one_image_in_training_and_validation(phantoms, tmp_path):
    """Batches of 2 over 3 training and 3 validation slices: every handler (images, metrics) copes with one image."""
    wf = workflow(
        "train_controlnet.json",
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(tmp_path / "models"),
        run_dir=str(tmp_path / "run"),
        **{**TINY, "cn_batch_size": 2, "train_limit": 3, "val_limit": 3},
    )
    wf.run()
    assert (tmp_path / "run" / "controlnet.pt").is_file() and not (tmp_path / "models").exists()


def test_trained_controlnet_starts_from_base_unet_and_keeps_it_frozen(trained):
    cn = load_weights(trained / "controlnet.pt")["controlnet"]
    base = load_weights(BASE_MODELS / "diffusion_model.pt")["unet"]
    shared = [k for k in cn if k in base and k.startswith("down_blocks.")]
    assert shared, "the ControlNet encoder has the UNet's structure"
    # one epoch moves the copied encoder only a little away from the UNet it started from
    drift = max((cn[k].float() - base[k].float()).abs().max().item() for k in shared)
    assert 0 < drift < 0.1
    assert (BASE_MODELS / "diffusion_model.pt").stat().st_mtime < (trained / "controlnet.pt").stat().st_mtime


def test_inference_2d_is_deterministic_and_writes_outputs(trained, tmp_path):
    outs = []
    for name in ("a", "b"):
        wf = workflow("inference.json", "infer", model_dir=str(trained), output_dir=str(tmp_path / name), **FAST)
        assert wf.check_properties() in (None, [])
        wf.run()
        wf.finalize()
        outs.append(sorted((tmp_path / name).iterdir()))
    names = [p.name for p in outs[0]]
    stem = names[0].removesuffix(".json")
    assert re.fullmatch(r"sub-0011_slice-2_FLAIR_T1w_seed0_[0-9a-f]{8}", stem)
    assert names == [f"{stem}.json", f"{stem}.nii.gz", f"{stem}.png"]
    for a, b in zip(*outs, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs with the same seed"
    src, out = nib.load(EXAMPLE), nib.load(outs[0][1])
    assert out.shape == src.shape == (80, 112) and np.allclose(out.affine, src.affine)
    sidecar = json.loads(outs[0][0].read_text())
    assert sidecar["bundle"] == "flair_to_t1_controlnet" and sidecar["seed"] == 0
    assert {"conditioning_scale", "guidance_scale", "num_inference_steps", "version", "input_image"} <= set(sidecar)


def test_inference_3d_volume_round_trip(trained, phantoms, tmp_path):
    flairs = sorted((phantoms / "images").glob("sub-0000_slice-*_FLAIR.nii.gz"))
    volume = np.stack([nib.load(p).get_fdata() for p in flairs], axis=-1) * 900.0  # scanner-like range
    affine = np.array([[-2.0, 0, 0, 80], [0, 2.0, 0, -112], [0, 0, 4.0, -10], [0, 0, 0, 1]])
    image = nib.Nifti1Image(volume.astype(np.int16), affine)
    image.header["descrip"] = b"FLAIR volume"
    src = tmp_path / "sub-0000_FLAIR.nii.gz"
    nib.save(image, str(src))
    wf = workflow(
        "inference.json",
        "infer",
        model_dir=str(trained),
        input_image=str(src),
        output_dir=str(tmp_path / "out"),
        seed=5,
        **FAST,
    )
    wf.run()
    wf.finalize()
    (written,) = (tmp_path / "out").glob("sub-0000_FLAIR_T1w_seed5_*.nii.gz")
    out = nib.load(written)
    assert out.shape == volume.shape == (80, 112, 2)
    assert np.allclose(out.affine, affine) and out.header.get_zooms() == image.header.get_zooms()
    assert out.header["descrip"].tobytes().startswith(b"FLAIR volume")
    data = out.get_fdata()
    assert data.dtype.kind == "f" and 0 <= data.min() and data.max() <= 1
    sidecar = json.loads(Path(str(written).replace(".nii.gz", ".json")).read_text())
    assert sidecar["input_kind"] == "volume" and sidecar["num_slices"] == 2 and sidecar["input_rescaled"]
    assert not list((tmp_path / "out").glob("*.png"))


def test_png_input(trained, tmp_path):
    from monai.data import PILWriter

    array = nib.load(EXAMPLE).get_fdata().astype(np.float32)
    writer = PILWriter(output_dtype=np.uint8, scale=255)
    writer.set_data_array(array[None], channel_dim=0, squeeze_end_dims=True)
    writer.set_metadata({"spatial_shape": array.shape})
    writer.write(str(tmp_path / "flair.png"), verbose=False)
    wf = workflow(
        "inference.json",
        "infer",
        model_dir=str(trained),
        input_image=str(tmp_path / "flair.png"),
        output_dir=str(tmp_path / "out"),
        **FAST,
    )
    wf.run()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n.split("_seed0_")[0] for n in names] == ["flair_T1w"] * 3
    assert [n.split(".", 1)[1] for n in names] == ["json", "nii.gz", "png"]
    assert nib.load(tmp_path / "out" / names[1]).header.get_zooms()[:2] == (2.0, 2.0)


def _bad_inputs(d: Path) -> dict[str, tuple[str, str]]:
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((64, 64)).astype(np.float32), np.eye(4)), str(d / "small.nii.gz"))
    nan = rng.random((80, 112)).astype(np.float32)
    nan[10, 10] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(d / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(rng.random((80, 112, 4, 2)).astype(np.float32), np.eye(4)), str(d / "two.nii.gz"))
    (d / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    return {
        "size": (str(d / "small.nii.gz"), "model expects (80, 112)"),
        "nan": (str(d / "nan.nii.gz"), "NaN"),
        "modalities": (str(d / "two.nii.gz"), "takes exactly one (FLAIR)"),
        "unreadable": (str(d / "broken.nii.gz"), "Cannot read"),
        "missing": (str(d / "none.nii.gz"), "not found"),
    }


@pytest.mark.parametrize("case", ["size", "nan", "modalities", "unreadable", "missing"])
def test_bad_input_fails_before_writing(case, tmp_path):
    path, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        wf = workflow("inference.json", "infer", input_image=path, output_dir=str(out), **FAST)
        wf.run()
    assert message in error_text(info.value)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written for bad input"


def test_missing_base_model_names_the_fix(tmp_path):
    with pytest.raises(Exception) as info:
        wf = workflow("inference.json", "infer", base_model_dir=str(tmp_path), output_dir=str(tmp_path / "out"), **FAST)
        wf.run()
    text = error_text(info.value)
    assert "brain_t1_ldm" in text and "--base_model_dir" in text
    assert not (tmp_path / "out").exists()


def test_weights_of_another_base_model_are_refused(tmp_path):
    """Swapping brain_t1_ldm for a different model must not silently translate with mismatched residuals."""
    other_base = tmp_path / "other_base"
    shutil.copytree(BASE_MODELS, other_base)
    weights = load_weights(other_base / "diffusion_model.pt")
    weights["unet"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in weights["unet"].items()}
    torch.save(weights, other_base / "diffusion_model.pt")
    with pytest.raises(Exception) as info:
        wf = workflow(
            "inference.json", "infer", base_model_dir=str(other_base), output_dir=str(tmp_path / "out"), **FAST
        )
        wf.run()
    assert "trained against another base UNet" in error_text(info.value)
    assert not (tmp_path / "out").exists()


EVAL = ["inference.json", "evaluate.json"]


def test_evaluate_computes_and_logs_without_touching_the_bundle(trained, phantoms):
    before = snapshot(BUNDLE)
    wf = workflow(EVAL, "infer", model_dir=str(trained), dataset_dir=str(phantoms), test_limit=2, num_inference_steps=2)
    wf.run()
    results = wf.parser.get_parsed_content("report").results
    assert results["num_test_images"] == 2
    assert results["metrics"]["psnr"] > 0 and 0 <= results["metrics"]["mae"] <= 1
    assert -1 <= results["metrics"]["ms_ssim"] <= 1 and results["std"]["psnr"] >= 0
    assert results["provenance"]["weights"]["controlnet"]["demo"] is False
    assert snapshot(BUNDLE) == before, "evaluation without --publish must leave the bundle as it was"


def test_publish_writes_results_readme_figure_and_metrics(trained, phantoms, tmp_path):
    bundle = copy_bundle(tmp_path, "flair_to_t1_controlnet")
    (tmp_path / "brain_t1_ldm").symlink_to(BASE_MODELS.parent)
    wf = bundle_workflow(
        bundle, EVAL, "infer", model_dir=str(trained), dataset_dir=str(phantoms), num_inference_steps=2, publish=True
    )
    wf.run()
    results = json.loads((bundle / "docs" / "evaluation_results.json").read_text())
    assert (
        json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]["psnr"]
        == results["metrics"]["psnr"]
    )
    assert "26.25 ± 1.01" in (bundle / "docs" / "README.md").read_text()
    assert (bundle / "docs" / "translation_examples.png").is_file()


def test_publishing_a_subset_is_refused_before_work(trained, phantoms):
    with pytest.raises(Exception) as info:
        workflow(EVAL, "infer", model_dir=str(trained), dataset_dir=str(phantoms), test_limit=2, publish=True)
    assert "whole test split" in error_text(info.value)


def test_shipped_configs_properties():
    assert workflow("inference.json", "infer").check_properties() in (None, [])


def test_full_size_overlay_builds_reference_networks(tmp_path):
    """The ControlNet mirrors whatever base it is given: here a full-size base, known from its weights' record."""
    from monai.bundle import ConfigParser

    full_unet = {
        "spatial_dims": 2, "in_channels": 3, "out_channels": 3, "channels": [256, 512, 768],
        "attention_levels": [False, True, True], "num_head_channels": [0, 512, 768], "num_res_blocks": 2,
        "with_conditioning": True, "cross_attention_dim": 1024, "norm_num_groups": 32,
    }  # fmt: skip
    record = {"unet": {"network": "DiffusionModelUNet", "args": full_unet}}
    torch.save({"unet": {}, "architectures": record}, tmp_path / "diffusion_model.pt")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train_controlnet.json"), str(CONFIGS / "full_size.json")])
    parser["bundle_root"] = str(BUNDLE)
    parser["base_model_dir"] = str(tmp_path)
    controlnet = parser.get_parsed_content("network_def")
    # the conditioning embedding takes the full-resolution FLAIR down x8, to the latent size
    emb = controlnet.controlnet_cond_embedding(torch.zeros(1, 1, 160, 224))
    assert tuple(emb.shape) == (1, 256, 20, 28)
    assert parser.get_parsed_content("conditioning_channels") == [64, 128, 128, 256]


def test_cli_from_bundle_folder_with_shipped_weights(tmp_path):
    """The issue's command: the shipped example FLAIR in, a T1w out."""
    cmd = [PY, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--seed", "0"]
    cmd += ["--output_dir", str(tmp_path), "--num_inference_steps", "5"]
    done = subprocess.run(cmd, cwd=BUNDLE, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = tmp_path.glob("sub-0011_slice-2_FLAIR_T1w_seed0_*.nii.gz")
    t1 = nib.load(written).get_fdata()
    truth = nib.load(BUNDLE / "examples" / "sub-0011_slice-2_T1w.nii.gz").get_fdata()
    assert t1.shape == truth.shape
    # the demo model follows the anatomy of the input: far closer to its own T1w than to a flipped one
    assert np.abs(t1 - truth).mean() < np.abs(t1 - truth[::-1]).mean()


def test_layered_evaluate_from_the_repository_root(phantoms, tmp_path):
    """Config stacks work from the repository root with their paths and --bundle_root, and change no file."""
    before = snapshot(BUNDLE)
    configs = "['bundles/flair_to_t1_controlnet/configs/inference.json','bundles/flair_to_t1_controlnet/configs/evaluate.json']"
    cmd = [PY, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", "bundles/flair_to_t1_controlnet"]
    cmd += ["--dataset_dir", str(phantoms), "--test_limit", "2", "--num_inference_steps", "2"]
    done = subprocess.run(cmd, cwd=REPO, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Evaluation on 2 images" in done.stdout + done.stderr
    assert snapshot(BUNDLE) == before


def _train_args(phantoms: Path, tmp_path: Path, epochs: int) -> list[str]:
    args = [PY, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train_controlnet.json")]
    args += ["--bundle_root", str(BUNDLE), "--dataset_dir", str(phantoms), "--model_dir", str(tmp_path / "models")]
    args += ["--run_dir", str(tmp_path / "run"), "--cn_max_epochs", str(epochs), "--cn_batch_size", "4"]
    return args + ["--train_limit", "8", "--val_interval", "100"]


def test_training_killed_midway_resumes(phantoms, tmp_path):
    run_dir = tmp_path / "run"
    args = _train_args(phantoms, tmp_path, epochs=4)
    kill_at_checkpoint(args, run_dir / "checkpoint_epoch=2.pt")
    assert not (run_dir / "controlnet.pt").exists(), "a killed run must not export final weights"
    done = subprocess.run(args, cwd=REPO, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "checkpoint_epoch=" in log and "Epoch[1] Complete" not in log and "Epoch[4] Complete" in log, log[-2000:]
    assert (run_dir / "controlnet.pt").is_file()
    assert not (tmp_path / "models" / "controlnet.pt").exists(), "training installs weights only when asked"


def test_missing_pairs_in_datalist_are_reported(phantoms, tmp_path):
    data = json.loads((phantoms / "datalist.json").read_text())
    for split in ("training", "validation", "test"):
        for item in data[split]:
            item.pop("flair", None)
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(phantoms / "images")
    with pytest.raises(Exception) as info:
        wf = workflow(
            "train_controlnet.json",
            "train",
            dataset_dir=str(tmp_path),
            run_dir=str(tmp_path / "r"),
            model_dir=str(tmp_path / "m"),
            **TINY,
        )
        wf.run()
    assert "--with_flair" in error_text(info.value)


def test_torchrun_two_processes_on_cpu(phantoms, tmp_path):
    configs = json.dumps([str(CONFIGS / "train_controlnet.json"), str(CONFIGS / "multi_gpu_train.json")])
    args = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "monai.bundle", "run"]
    args += ["--config_file", configs, "--bundle_root", str(BUNDLE), "--dataset_dir", str(phantoms)]
    args += ["--model_dir", str(tmp_path / "models"), "--run_dir", str(tmp_path / "run"), "--cn_max_epochs", "1"]
    args += ["--cn_batch_size", "2", "--train_limit", "8", "--val_interval", "100"]
    done = subprocess.run(args, cwd=REPO, env=bundle_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["checkpoint_epoch=1.pt", "controlnet.pt"]
    state = load_weights(tmp_path / "run" / "controlnet.pt")["controlnet"]
    assert not any(k.startswith("module.") for k in state), "weights are saved without the DDP wrapper"
