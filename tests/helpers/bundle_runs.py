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
