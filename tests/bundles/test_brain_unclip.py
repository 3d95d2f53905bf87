"""End-to-end tests of the brain_unclip bundle configs built so far (stage 1: the CLIP), on tiny brain phantoms.

The networks are trained here, in temporary folders; the bundle's own ``models/`` is only read (tokenizer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle.properties import TrainProperties

from common.data.brain.phantoms import PhantomGeometry, write_phantom_dataset
from common.io.weights import load_weights
from common.networks.architecture import network_from_weights
from tests.helpers import REPO_ROOT
from tests.helpers.bundle_runs import TINY_CLIP, bundle_env, kill_at_checkpoint
from tests.helpers.bundle_runs import workflow as bundle_workflow

pytestmark = pytest.mark.bundle

BUNDLE = REPO_ROOT / "bundles" / "brain_unclip"


def workflow(config, workflow_type, **overrides):
    return bundle_workflow(BUNDLE, config, workflow_type, **overrides)


def assert_required_train_properties(run) -> None:
    """MONAI's required train properties, one by one.

    ``check_properties()`` also needs ``configs/metadata.json``, which the bundle gets when it ships (with
    ``inference.json``): verify-bundles and package-bundles pick up every folder that has one.
    """
    required = [name for name, spec in TrainProperties.items() if spec.get("required")]
    assert "trainer" in required and all(getattr(run, name) is not None for name in required)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("brain_phantoms")
    geometry = PhantomGeometry.demo(num_slices=4)
    write_phantom_dataset(out, 4, geometry, seed=0, val_fraction=0.25, test_fraction=0.25, progress=False)
    return out


def test_clip_stage_trains_validates_and_exports_a_rebuildable_clip(phantoms, tmp_path):
    """train_clip.json: captions from the slices' facts, Recall@K on canonical captions, the CLIP exported."""
    run = workflow(
        "train_clip.json",
        "train",
        dataset_dir=str(phantoms),
        run_dir=str(tmp_path / "runs"),
        clip_weights_path=str(tmp_path / "installed_clip.pt"),
        install_weights=True,
        demo_weights=True,
        clip_max_epochs=2,
        **TINY_CLIP,
    )
    assert_required_train_properties(run)
    # training captions are random phrasings of each slice's facts; validation's are the canonical ones
    train_data = run.parser.get_parsed_content("train#dataset")
    captions = {train_data[0]["caption"] for _ in range(8)}
    assert len(captions) > 1 and all("T1" in c for c in captions), captions
    val_data = run.parser.get_parsed_content("validate#dataset")
    assert val_data[0]["caption"].startswith("T1-weighted brain MRI, axial slice at z=")
    assert val_data[0]["caption"] == val_data[0]["caption"], "validation captions do not change between epochs"
    run.run()
    metrics = run.parser.get_parsed_content("validate#evaluator").state.metrics
    run.finalize()
    assert set(metrics) == {"val_text_to_image_R@5", "val_text_to_image_R@1", "val_image_to_text_R@5"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())

    exported = tmp_path / "runs" / "clip.pt"
    assert exported.read_bytes() == (tmp_path / "installed_clip.pt").read_bytes()
    weights = load_weights(exported)
    assert weights["provenance"]["demo"] is True
    clip = network_from_weights(weights, "clip", exported)
    checkpoint = torch.load(tmp_path / "runs" / "checkpoint_epoch=2.pt", weights_only=False)["clip"]
    trained = {k.removeprefix("model."): v for k, v in checkpoint.items() if k.startswith("model.")}
    assert trained.keys() == clip.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in clip.state_dict().items()), "the export is the trained CLIP"
    assert clip.config.projection_dim == 16 and clip.config.vision_config.image_size == 32


def test_clip_stage_killed_midway_resumes_from_its_last_checkpoint(phantoms, tmp_path):
    runs = tmp_path / "runs"
    args = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train_clip.json"),
        "--bundle_root", str(BUNDLE), "--dataset_dir", str(phantoms), "--run_dir", str(runs), "--num_threads", "1",
        *[f"--{k}={v}" for k, v in TINY_CLIP.items() if k != "val_interval"], "--val_interval=1000",
    ]  # fmt: skip
    kill_at_checkpoint([*args, "--clip_max_epochs=1000"], runs / "checkpoint_epoch=*.pt")  # tiny epochs: any one
    assert not (runs / "clip.pt").exists(), "nothing is exported by a run that did not complete"
    latest = max(int(p.stem.split("=")[1]) for p in runs.glob("checkpoint_epoch=*.pt"))
    resumed = subprocess.run(
        [*args, f"--clip_max_epochs={latest + 2}"],
        cwd=REPO_ROOT,
        env=bundle_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert "Restored all variables from" in log, log[-2000:]
    assert "Epoch[1] Complete" not in log and f"Epoch[{latest + 2}] Complete" in log
    assert (runs / "clip.pt").is_file()


def test_bad_option_is_refused_before_work(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train_clip.json",
            "--clip_batch_size", "1", "--run_dir", str(tmp_path / "runs"),
        ],
        cwd=BUNDLE, env=bundle_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--clip_batch_size" in result.stderr.strip().splitlines()[-1] + result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tiny_clip(phantoms, tmp_path_factory) -> Path:
    """A CLIP trained one tiny epoch through train_clip.json, installed in a scratch folder."""
    folder = tmp_path_factory.mktemp("clip")
    run = workflow(
        "train_clip.json",
        "train",
        dataset_dir=str(phantoms),
        run_dir=str(folder / "runs"),
        clip_weights_path=str(folder / "clip.pt"),
        install_weights=True,
        clip_max_epochs=1,
        **TINY_CLIP,
    )
    run.run()
    run.finalize()
    return folder / "clip.pt"


def test_prior_stage_trains_on_cached_clip_embeddings_and_records_its_clip(phantoms, tiny_clip, tmp_path):
    """train_prior.json: image embeddings cached once by the frozen CLIP, standardiser fitted on them, export paired."""
    from common.networks.pairing import fingerprint

    overrides = {k: v for k, v in TINY_CLIP.items() if not k.startswith(("clip_", "text_"))}
    run = workflow(
        ["train_clip.json", "train_prior.json"],
        "train",
        dataset_dir=str(phantoms),
        run_dir=str(tmp_path / "runs"),
        clip_weights_path=str(tiny_clip),
        prior_path=str(tmp_path / "prior.pt"),
        install_weights=True,
        prior_max_epochs=2,
        prior_batch_size=4,
        prior_width=16,
        prior_layers=1,
        prior_heads=2,
        **overrides,
    )
    assert_required_train_properties(run)
    items = run.parser.get_parsed_content("train#dataset").data
    assert all(item["image_embedding"].shape == (16,) and "image" not in item for item in items)
    cached = list((tmp_path / "runs" / "embedding_cache").glob("clip_image_embeddings_*.pt"))
    assert len(cached) == 2, "one file per split (training, validation)"
    batch = run.parser.get_parsed_content("train#dataset")[0]
    assert set(batch) == {"image_embedding", "caption"} and "T1" in batch["caption"]
    run.run()
    val_mse = run.parser.get_parsed_content("validate#evaluator").state.metrics["val_mse"]
    clip = run.parser.get_parsed_content("frozen_clip")
    run.finalize()
    assert val_mse > 0

    weights = load_weights(tmp_path / "prior.pt")
    assert set(weights) == {"prior", "scheduler", "depends_on", "architectures", "provenance"}
    assert weights["depends_on"] == {"clip": fingerprint("clip", clip.model)}
    assert weights["scheduler"]["prediction_type"] == "sample" and weights["scheduler"]["schedule"] == "cosine"
    prior = network_from_weights(weights, "prior")
    embeddings = torch.stack([item["image_embedding"] for item in items])
    torch.testing.assert_close(prior.standardizer.mean, embeddings.mean(0))
    assert bool(prior.standardizer.fitted)


def test_decoder_stage_trains_in_brain_t1_ldm_latent_space_on_cached_embeddings(phantoms, tiny_clip, tmp_path):
    """train_decoder.json: embeddings and latents cached once, brain_t1_ldm's autoencoder, export paired and usable."""
    from common.diffusion.latent_space import ScaledLatentSpace
    from common.diffusion.sampling import GuidedLatentSampler
    from common.diffusion.schedules import SchedulerSettings
    from common.networks.embedding_context import null_context
    from common.networks.pairing import fingerprint

    overrides = {k: v for k, v in TINY_CLIP.items() if not k.startswith(("clip_", "text_"))}
    run = workflow(
        ["train_clip.json", "train_decoder.json"],
        "train",
        dataset_dir=str(phantoms),
        run_dir=str(tmp_path / "runs"),
        clip_weights_path=str(tiny_clip),
        decoder_path=str(tmp_path / "decoder.pt"),
        install_weights=True,
        decoder_max_epochs=1,
        decoder_batch_size=4,
        **overrides,
    )
    assert_required_train_properties(run)
    assert run.parser.get_parsed_content("autoencoder_path").endswith("brain_t1_ldm/models/autoencoder.pt")
    items = run.parser.get_parsed_content("train#dataset").data
    assert all({"image_embedding", "z_mu", "z_sigma"} <= set(item) and "image" not in item for item in items)
    assert set(run.parser.get_parsed_content("train#dataset")[0]) == {"image_embedding", "z_mu", "z_sigma"}
    for cache in ("embedding_cache/clip_image_embeddings_*.pt", "latent_cache/latent_moments_*.pt"):
        assert len(list((tmp_path / "runs").glob(cache))) == 2, f"one {cache} per split"
    run.run()
    clip, autoencoder = run.parser.get_parsed_content("frozen_clip"), run.parser.get_parsed_content("autoencoder")
    run.finalize()

    weights = load_weights(tmp_path / "decoder.pt")
    assert set(weights) == {"decoder", "latent", "scheduler", "depends_on", "architectures", "provenance"}
    assert weights["depends_on"] == {
        "autoencoder": fingerprint("autoencoder", autoencoder),
        "clip": fingerprint("clip", clip.model),
    }
    assert weights["latent"]["scale_factor"] > 0 and weights["scheduler"]["prediction_type"] == "v_prediction"
    decoder = network_from_weights(weights, "decoder").eval()
    latent_space = ScaledLatentSpace(autoencoder, weights["latent"]["scale_factor"])
    sampler = GuidedLatentSampler(
        latent_space, SchedulerSettings.from_state(weights["scheduler"]), num_inference_steps=2
    )
    embedding = items[0]["image_embedding"][None]
    images = sampler(torch.randn(1, 3, 20, 28), decoder, context=embedding, uncond_context=null_context(embedding))
    assert images.shape == (1, 1, 80, 112) and torch.isfinite(images).all()
