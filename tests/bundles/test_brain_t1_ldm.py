"""End-to-end tests of the brain_t1_ldm bundle configs on tiny phantom data (CPU, minutes in all)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch

from common.data.brain.phantoms import PhantomGeometry, write_phantom_dataset
from common.data.datalists import load_datalist
from common.io.weights import load_weights
from tests.helpers import REPO_ROOT
from tests.helpers.bundle_copy import copy_bundle
from tests.helpers.bundle_runs import (
    bundle_env,
    distil_and_sample,
    error_text,
    kill_at_checkpoint,
    scratch_model_dir,
    snapshot,
    train_tiny_latent_diffusion,
)
from tests.helpers.bundle_runs import workflow as bundle_workflow

pytestmark = pytest.mark.bundle

REPO = REPO_ROOT
BUNDLE = REPO / "bundles" / "brain_t1_ldm"
CONFIGS = BUNDLE / "configs"
SHIPPED = BUNDLE / "models"
PY = sys.executable

TINY_AE = {
    "ae_max_epochs": 1,
    "ae_batch_size": 4,
    "num_workers": 0,
    "train_limit": 8,
    "val_limit": 4,
    "val_interval": 1,
}
TINY_LDM = {
    "ldm_max_epochs": 1,
    "ldm_batch_size": 4,
    "num_workers": 0,
    "train_limit": 8,
    "val_limit": 4,
    "val_interval": 1,
}
TINY_LDM["sample_steps"] = 2


def workflow(config, workflow_type, **overrides):
    return bundle_workflow(BUNDLE, config, workflow_type, **overrides)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, num_subjects=8, geometry=PhantomGeometry.demo(num_slices=2), seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return scratch_model_dir(SHIPPED, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def trained(phantoms, model_dir, tmp_path_factory) -> Path:
    """Autoencoder then diffusion, one tiny epoch each, through the shipped train configs, installed in model_dir."""
    train_tiny_latent_diffusion(BUNDLE, phantoms, model_dir, tmp_path_factory.mktemp("runs"), TINY_AE, TINY_LDM)
    return model_dir


def test_a_last_validation_batch_of_one_image_and_export_to_the_run_only(phantoms, tmp_path):
    """Validation batches that hold one image (the phantom split has 2 validation slices): every handler copes.

    Without ``--install_weights True`` the trained weights go to the run folder and the bundle's models/ is untouched.
    """
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "autoencoder.pt").write_bytes(b"shipped")
    wf = workflow(
        "train_autoencoder.json",
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(tmp_path / "models"),
        run_dir=str(tmp_path / "run"),
        **{**TINY_AE, "ae_batch_size": 1, "train_limit": 2, "val_limit": 3},
    )
    wf.run()
    assert (tmp_path / "models" / "autoencoder.pt").read_bytes() == b"shipped"
    assert (
        load_weights(tmp_path / "run" / "autoencoder.pt")["architectures"]["autoencoder"]["network"] == "AutoencoderKL"
    )
    assert any((tmp_path / "run").glob("events.out.tfevents*"))


def test_train_configs_write_checkpoints_and_tensorboard(trained, tmp_path_factory):
    runs = list(Path(trained).parent.parent.rglob("checkpoint_epoch=1.pt"))
    assert runs, "each training run keeps a resumable checkpoint"


def test_compiled_bf16_training_runs_the_unet_in_bf16_and_exports_float32(trained, phantoms, tmp_path):
    """``--precision bf16 --compile True``: the trainer's UNet is compiled and its forward passes run under bf16
    autocast on a CPU; the exported weights are the plain module's, in float32."""
    wf = workflow(
        ["train_autoencoder.json", "train_diffusion.json"],
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(trained),
        run_dir=str(tmp_path / "run"),
        precision="bf16",
        compile=True,
        **TINY_LDM,
    )
    unet = wf.parser.get_parsed_content("network")
    assert wf.trainer.network is not unet and wf.trainer.network._orig_mod is unet, "MONAI's trainer compiles it"
    dtypes = []
    unet.out.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    wf.run()
    wf.finalize()
    assert dtypes and set(dtypes) == {torch.bfloat16}, "training and validation forward passes in bf16"
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items()), "the compiled UNet trained"
    assert torch.isfinite(torch.as_tensor(wf.trainer.state.output["loss"])).all()
    exported = load_weights(tmp_path / "run" / "diffusion_model.pt")["unet"]
    assert all(v.dtype == torch.float32 for v in exported.values() if v.is_floating_point())


def test_fine_tuning_continues_the_given_diffusion_model_and_exports_its_weight_average(trained, phantoms, tmp_path):
    """``finetune_diffusion.json`` starts from the given UNet with its scale factor and noise schedule; what is
    validated and exported is the moving average of the weights (ignite's EMA), which the checkpoint keeps beside the
    online weights for resuming."""
    start = load_weights(trained / "diffusion_model.pt")
    wf = workflow(
        ["train_autoencoder.json", "train_diffusion.json", "finetune_diffusion.json"],
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(trained),
        run_dir=str(tmp_path / "run"),
        ema_decay=0.5,
        **{**TINY_LDM, "ldm_max_epochs": 2},
    )
    online = wf.parser.get_parsed_content("network_def")
    assert all(torch.equal(v, start["unet"][k]) for k, v in online.state_dict().items()), "starts from the given UNet"
    wf.run()
    wf.finalize()
    exported = load_weights(tmp_path / "run" / "diffusion_model.pt")
    assert exported["latent"] == start["latent"] and exported["scheduler"] == start["scheduler"]
    assert exported["depends_on"] == start["depends_on"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_epoch=2.pt", weights_only=True)
    for key, value in exported["unet"].items():
        assert torch.equal(value, checkpoint["unet_ema"][key])
    moved = [
        k for k, v in online.state_dict().items() if v.is_floating_point() and not torch.equal(v, start["unet"][k])
    ]
    assert moved, "the online UNet trained"
    assert all(not torch.equal(exported["unet"][k], online.state_dict()[k]) for k in moved), "the average is exported"
    assert all(not torch.equal(exported["unet"][k], start["unet"][k]) for k in moved), (
        "and it moved towards the training"
    )


def test_inference_with_trained_weights_is_deterministic(trained, tmp_path):
    outs = []
    for name in ("a", "b"):
        wf = workflow(
            "inference.json",
            "infer",
            model_dir=str(trained),
            output_dir=str(tmp_path / name),
            num_samples=2,
            num_inference_steps=3,
            progress=False,
        )
        assert wf.check_properties() in (None, [])
        wf.run()
        wf.finalize()
        outs.append(sorted((tmp_path / name).iterdir()))
    assert [p.name for p in outs[0]] == [p.name for p in outs[1]]
    assert len(outs[0]) == 6  # 2 samples x (NIfTI, PNG, JSON)
    for a, b in zip(*outs, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs with the same seed"
    nii = next(p for p in outs[0] if p.name.endswith(".nii.gz"))
    img = nib.load(nii)
    assert img.shape == (80, 112)
    assert tuple(float(z) for z in img.header.get_zooms()) == (2.0, 2.0)
    sidecar = json.loads(next(p for p in outs[0] if p.suffix == ".json").read_text())
    assert sidecar["bundle"] == "brain_t1_ldm" and sidecar["seed"] in (0, 1)
    assert {"prompt", "guidance_scale", "num_inference_steps", "version"} <= set(sidecar)


EVAL = ["inference.json", "evaluate.json"]
QUICK_EVAL = {"eval_num_inference_steps": 2, "feature_extractor_weights": str(SHIPPED / "feature_network.pt")}


def test_guidance_distillation_makes_the_student_inference_samples_with(trained, phantoms, tmp_path):
    """distill_guidance.json makes a student that inference samples with at guidance 2 (``distil_and_sample``);
    evaluation samples its unconditional images with the teacher and its captioned ones with the student."""
    models = distil_and_sample(BUNDLE, trained, phantoms, tmp_path, TINY_LDM, scale=2.0)
    wf = workflow(EVAL, "infer", model_dir=str(models), dataset_dir=str(phantoms), eval_num_samples=4, **QUICK_EVAL)
    assert wf.parser.get_parsed_content("evaluation").network is wf.parser.get_parsed_content("base_network")
    results = wf.parser.get_parsed_content("evaluation").run()
    assert results["captioned_generation"]["distilled_guidance"] == 2.0
    assert {"diffusion_model", "diffusion_model_distilled"} <= set(results["provenance"]["weights"])


def test_evaluate_computes_and_logs_without_touching_the_bundle(trained, phantoms):
    """Evaluation on the split asked for (here validation, where settings are chosen) only logs its figures."""
    before = snapshot(BUNDLE)
    wf = workflow(
        EVAL,
        "infer",
        model_dir=str(trained),
        dataset_dir=str(phantoms),
        eval_num_samples=4,
        eval_split="validation",
        **QUICK_EVAL,
    )
    results = wf.parser.get_parsed_content("evaluation").run()
    assert results["split"] == "validation"
    assert results["num_real_test_images"] == len(load_datalist(str(phantoms), "validation"))
    metrics = results["metrics"]
    assert 0 <= metrics["reconstruction_ms_ssim_test"] <= 1
    assert 0 <= metrics["sample_diversity_ms_ssim"] <= 1
    assert metrics["fid"] >= 0 and metrics["reconstruction_psnr_test"] > 0
    weights = results["provenance"]["weights"]
    assert set(weights) == {"autoencoder", "diffusion_model", "text_encoder"}
    # freshly trained networks are not demo weights; the copied shipped text encoder is, so the run says demo
    assert not weights["diffusion_model"]["demo"] and weights["text_encoder"]["demo"]
    assert results["provenance"]["demo_weights"] is True
    assert snapshot(BUNDLE) == before, "evaluation without --publish must leave the bundle as it was"


def test_publishing_a_partial_evaluation_is_refused_before_work(trained, phantoms):
    with pytest.raises(Exception) as info:
        workflow(EVAL, "infer", model_dir=str(trained), dataset_dir=str(phantoms), publish=True, test_limit=2)
    assert "whole test split" in error_text(info.value)
    with pytest.raises(Exception) as info:
        workflow(
            EVAL, "infer", model_dir=str(trained), dataset_dir=str(phantoms), publish=True, eval_split="validation"
        )
    assert "whole test split" in error_text(info.value)
    with pytest.raises(Exception) as info:
        workflow(EVAL, "infer", model_dir=str(trained), dataset_dir=str(phantoms), publish=True, eval_num_samples=8)
    assert "at least 100 generated samples" in error_text(info.value)


def test_publish_writes_the_docs_of_the_bundle_it_runs_in(trained, phantoms, tmp_path):
    bundle = copy_bundle(tmp_path)
    wf = bundle_workflow(
        bundle,
        EVAL,
        "infer",
        model_dir=str(trained),
        dataset_dir=str(phantoms),
        publish=True,
        eval_num_samples=100,
        eval_batch_size=50,
        **QUICK_EVAL,
    )
    wf.run()
    results = json.loads((bundle / "docs" / "evaluation_results.json").read_text())
    assert results["num_generated_samples"] == 100
    assert (
        json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]["fid"]
        == results["metrics"]["fid"]
    )
    readme = (bundle / "docs" / "README.md").read_text()
    assert f"{results['metrics']['fid']:.4f}" in readme and "Evaluated demo weights" in readme


def test_shipped_inference_config_properties():
    wf = workflow("inference.json", "infer")
    assert wf.check_properties() in (None, [])


def test_full_size_overlay_builds_reference_networks():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in ("train_autoencoder.json", "train_diffusion.json", "full_size.json")])
    parser["bundle_root"] = str(BUNDLE)
    parser["context_dim"] = 1024  # the OpenCLIP ViT-H/14 text tower's width (not loaded here)
    unet = parser.get_parsed_content("network_def")
    assert unet.block_out_channels == (256, 512, 768) or list(unet.block_out_channels) == [256, 512, 768]
    assert parser.get_parsed_content("image_size") == [160, 224]
    ae = parser.get_parsed_content("autoencoder_def")
    z = ae.encode_stage_2_inputs(torch.zeros(1, 1, 160, 224))
    assert tuple(z.shape) == (1, 3, 20, 28)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"prompt": ""}, "prompt` is empty"),
        ({"prompt": "brain " * 400}, "CLIP reads at most 77 tokens"),
        ({"scheduler": "euler"}, "Unknown scheduler 'euler'"),
        ({"num_inference_steps": -5}, "positive integer"),
        ({"scheduler": "ddpm", "num_inference_steps": 50}, "ddpm scheduler needs `num_inference_steps` equal"),
        ({"eta": 2.0}, "`eta` must be in [0, 1]"),
        ({"image_size": [81, 112]}, "not divisible"),
        ({"diffusion_path": "/nonexistent/diffusion_model.pt"}, "Weights file not found"),
        ({"output_dir": "/etc/hostname"}, "is a file: give --output_dir a folder"),
    ],
)
def test_bad_inference_input_fails_before_writing(override, message, tmp_path):
    out = tmp_path / "out"
    knobs = {"num_inference_steps": 2, "progress": False, "output_dir": str(out), **override}
    with pytest.raises(Exception) as info:
        wf = workflow("inference.json", "infer", **knobs)
        wf.run()
    text = error_text(info.value)
    assert message in text
    assert not out.exists() or not any(out.iterdir()), "nothing may be written for bad input"


def test_another_autoencoder_is_refused_before_sampling(tmp_path):
    """The shipped diffusion model with an autoencoder whose latent space differs must not decode noise silently."""
    models = tmp_path / "models"
    shutil.copytree(SHIPPED, models)
    weights = load_weights(models / "autoencoder.pt")
    key = next(k for k in weights["autoencoder"] if k.startswith("encoder."))
    weights["autoencoder"][key] = weights["autoencoder"][key] + 0.01
    torch.save(weights, models / "autoencoder.pt")
    with pytest.raises(Exception) as info:
        workflow("inference.json", "infer", model_dir=str(models), output_dir=str(tmp_path / "out")).run()
    assert "was trained with another autoencoder" in error_text(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_from_bundle_folder_and_repo_root(tmp_path):
    cmd = [
        PY,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--seed",
        "0",
        "--num_samples",
        "1",
        "--num_inference_steps",
        "2",
        "--output_dir",
        str(tmp_path / "a"),
    ]
    # both runs at once: they are independent, and the machine has two cores
    from_folder = subprocess.Popen(cmd, cwd=BUNDLE, env=bundle_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cmd = [
        PY,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--bundle_root",
        str(BUNDLE),
        "--seed",
        "0",
        "--num_samples",
        "1",
        "--num_inference_steps",
        "2",
        "--output_dir",
        str(tmp_path / "b"),
    ]
    from_root = subprocess.Popen(cmd, cwd=REPO, env=bundle_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for proc in (from_folder, from_root):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 3
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_training_killed_midway_resumes_from_last_checkpoint(phantoms, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        PY,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(CONFIGS / "train_autoencoder.json"),
        "--bundle_root",
        str(BUNDLE),
        "--dataset_dir",
        str(phantoms),
        "--model_dir",
        str(tmp_path / "models"),
        "--run_dir",
        str(run_dir),
        "--ae_max_epochs",
        "4",
        "--ae_batch_size",
        "4",
        "--num_workers",
        "0",
        "--train_limit",
        "8",
        "--val_limit",
        "4",
        "--val_interval",
        "10",
    ]
    kill_at_checkpoint(args, run_dir / "checkpoint_epoch=2.pt")
    assert not (run_dir / "autoencoder.pt").exists(), "a killed run must not export final weights"
    done = subprocess.run(args, cwd=REPO, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "Restored all variables from" in log and "checkpoint_epoch=" in log, log[-2000:]
    assert "Epoch[1] Complete" not in log and "Epoch[4] Complete" in log
    assert (run_dir / "autoencoder.pt").is_file()
    assert not (tmp_path / "models" / "autoencoder.pt").exists(), "training installs weights only when asked"


def test_torchrun_two_processes_on_cpu(phantoms, tmp_path):
    """DDP overlay on gloo: the two ranks see different slices and only rank 0 writes a checkpoint."""
    seen = tmp_path / "seen"
    overlay = tmp_path / "record.json"
    overlay.write_text(
        json.dumps(
            {
                "batch_recorder": {"_target_": "tests.helpers.batch_recorder.BatchRecorder", "out_dir": str(seen)},
                "train#trainer#train_handlers": "$@train#handlers + [@batch_recorder]",
            }
        )
    )
    configs = json.dumps([str(CONFIGS / "train_autoencoder.json"), str(CONFIGS / "multi_gpu_train.json"), str(overlay)])
    args = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs,
        "--bundle_root",
        str(BUNDLE),
        "--dataset_dir",
        str(phantoms),
        "--model_dir",
        str(tmp_path / "models"),
        "--run_dir",
        str(tmp_path / "run"),
        "--ae_max_epochs",
        "1",
        "--ae_batch_size",
        "2",
        "--num_workers",
        "0",
        "--train_limit",
        "8",
        "--val_limit",
        "2",
        "--val_interval",
        "5",
    ]
    done = subprocess.run(args, cwd=REPO, env=bundle_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = set(json.loads((seen / "rank0.json").read_text()))
    rank1 = set(json.loads((seen / "rank1.json").read_text()))
    assert rank0 and rank1 and not rank0 & rank1
    assert len(list((tmp_path / "run").glob("checkpoint_*.pt"))) == 1
