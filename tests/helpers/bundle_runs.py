"""Running a bundle's configs in tests: in-process workflows, subprocess environments, error chains."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from monai.bundle import ConfigWorkflow

from common.io.weights import load_weights
from tests.helpers import REPO_ROOT

#: Overrides for a tiny CLIP training run (train_text_encoder.json of cxr_ldm, train_clip.json of brain_unclip).
TINY_CLIP = {
    "clip_batch_size": 4,
    "num_workers": 0,
    "train_limit": 8,
    "val_limit": 4,
    "val_interval": 1,
    "clip_image_size": 32,
    "clip_patch_size": 8,
    "clip_vision_width": 16,
    "clip_vision_layers": 1,
    "text_width": 16,
    "text_layers": 1,
    "clip_heads": 2,
    "clip_projection_dim": 16,
}


def bundle_env() -> dict[str, str]:
    """Environment for a bundle subprocess: the repository importable, no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def workflow(bundle: Path, config: str | Sequence[str], workflow_type: str, **overrides) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of ``bundle``'s ``configs/<config>`` (a list is layered in order)."""
    names = [config] if isinstance(config, str) else list(config)
    wf = ConfigWorkflow(
        config_file=[str(bundle / "configs" / name) for name in names],
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        logging_file=False,
        bundle_root=str(bundle),
        **overrides,
    )
    wf.initialize()
    return wf


def scratch_model_dir(shipped: Path, out: Path) -> Path:
    """``out`` with a copy of the shipped tokenizer and text encoder, so that training never touches the bundle."""
    shutil.copytree(shipped / "tokenizer", out / "tokenizer")
    shutil.copy(shipped / "text_encoder.pt", out / "text_encoder.pt")
    return out


def train_tiny_latent_diffusion(
    bundle: Path, dataset_dir: Path, model_dir: Path, runs: Path, ae: dict, ldm: dict
) -> dict:
    """Autoencoder, then diffusion, through ``bundle``'s shipped train configs, installed in ``model_dir``.

    Checks what every latent-diffusion bundle's training must give and returns the diffusion weights.
    """
    common = {"dataset_dir": str(dataset_dir), "model_dir": str(model_dir), "install_weights": True}
    stages = (("train_autoencoder.json",), ("train_autoencoder.json", "train_diffusion.json"))
    for configs, run_dir, overrides in zip(stages, ("ae", "ldm"), (ae, ldm), strict=True):
        run = workflow(bundle, list(configs), "train", run_dir=str(runs / run_dir), **common, **overrides)
        assert run.check_properties() in (None, [])
        run.run()
        run.finalize()
    assert (model_dir / "autoencoder.pt").is_file()
    assert (runs / "ldm" / "diffusion_model.pt").read_bytes() == (model_dir / "diffusion_model.pt").read_bytes()
    weights = load_weights(model_dir / "diffusion_model.pt")
    assert set(weights) == {"unet", "latent", "scheduler", "architectures", "provenance", "depends_on"}
    assert set(weights["depends_on"]) == {"autoencoder", "text_encoder"}
    assert weights["architectures"]["unet"]["network"] == "DiffusionModelUNet"
    assert weights["provenance"]["demo"] is False  # only weights trained for the demo say so
    assert weights["latent"]["scale_factor"] > 0
    assert weights["scheduler"]["prediction_type"] == "v_prediction"
    return weights


def distil_and_sample(bundle: Path, trained: Path, dataset_dir: Path, out: Path, ldm: dict, scale: float) -> Path:
    """Guidance distillation through ``bundle``'s shipped configs, then inference at and off the distilled guidance.

    Checks what every bundle with ``distill_guidance.json`` must give: the student records its guidance scale and its
    teacher; installed beside the teacher, inference at ``scale`` samples with it (one UNet call of B per step, said
    in the sidecar and the provenance), at another guidance with the teacher (2B); insisting on the student there
    stops before any work. Returns the model folder holding teacher and student (a copy of ``trained``).
    """
    import json

    import pytest
    import torch

    from common.io.weights import state_fingerprint

    models = out / "models"
    shutil.copytree(trained, models)
    configs = ["train_autoencoder.json", "train_diffusion.json", "distill_guidance.json"]
    run = workflow(
        bundle,
        configs,
        "train",
        dataset_dir=str(dataset_dir),
        model_dir=str(models),
        run_dir=str(out / "run"),
        install_weights=True,
        **ldm,
    )
    run.run()
    run.finalize()
    student = load_weights(models / "diffusion_model_distilled.pt")
    teacher = load_weights(models / "diffusion_model.pt")
    assert student["guidance_distillation"] == {"guidance_scale": scale, "teacher": state_fingerprint(teacher["unet"])}
    assert student["depends_on"] == teacher["depends_on"] and student["latent"] == teacher["latent"]
    assert any(not torch.equal(student["unet"][k], v) for k, v in teacher["unet"].items()), "the student trained"

    other = scale + 2.0
    for guidance, distilled in ((scale, True), (other, False)):
        images = out / f"images_{guidance:g}"
        wf = workflow(
            bundle,
            "inference.json",
            "infer",
            model_dir=str(models),
            output_dir=str(images),
            num_samples=2,
            batch_size=2,
            num_inference_steps=3,
            guidance_scale=guidance,
            progress=False,
        )
        sizes: list[int] = []
        unet = wf.parser.get_parsed_content("network")
        unet.register_forward_pre_hook(lambda module, args, sizes=sizes: sizes.append(args[0].shape[0]))
        wf.run()
        wf.finalize()
        assert sizes == [2 if distilled else 4] * 3
        sidecar = json.loads(next(images.glob("*.json")).read_text())
        assert sidecar["guidance_distilled"] is distilled and sidecar["guidance_scale"] == guidance
        assert ("diffusion_model_distilled" in sidecar["weights"]) is distilled

    refused = out / "refused"
    with pytest.raises(Exception) as info:
        workflow(
            bundle,
            "inference.json",
            "infer",
            model_dir=str(models),
            output_dir=str(refused),
            guidance_scale=other,
            guidance_distillation=True,
        ).run()
    assert f"distilled at guidance {scale:g}, and {other:g} is asked" in error_text(info.value)
    assert not refused.exists()
    return models


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """The error and every error it was raised from (MONAI wraps config errors)."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def error_text(err: BaseException) -> str:
    return "".join(str(e) for e in error_chain(err))


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` with its bytes (to prove a run changed nothing)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_at_checkpoint(args: Sequence[str], checkpoint: Path, timeout: float = 240) -> None:
    """Start a training command and kill it (SIGKILL, as a crash or a lost node would) once ``checkpoint`` is written.

    "Written" means a complete archive: killed while the file is still being saved, the run would have nothing to
    resume from (a truncated checkpoint is skipped), which is a different test. The name may be a glob pattern
    (``checkpoint_epoch=*.pt``: any checkpoint), for runs whose epochs are too quick to catch a given one before
    the checkpoint saver deletes it.
    """
    proc = subprocess.Popen(
        list(args), cwd=REPO_ROOT, env=bundle_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    try:
        while not any(zipfile.is_zipfile(path) for path in checkpoint.parent.glob(checkpoint.name)):
            assert proc.poll() is None, "training ended before it could be interrupted"
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
