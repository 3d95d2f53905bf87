"""End-to-end tests of the brain_unclip bundle on tiny brain phantoms: the four training stages (CLIP, prior,
decoder, LoRA), inference (text to image, variations, interpolation, LoRA), evaluation, bad inputs, and the shipped
demo weights.

Networks are trained here, in temporary folders; the bundle's own ``models/`` is only read."""

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
from tests.helpers.bundle_runs import TINY_CLIP, bundle_env, error_text, kill_at_checkpoint
from tests.helpers.bundle_runs import workflow as bundle_workflow

pytestmark = pytest.mark.bundle

BUNDLE = REPO_ROOT / "bundles" / "brain_unclip"


def workflow(config, workflow_type, **overrides):
    return bundle_workflow(BUNDLE, config, workflow_type, **overrides)


def assert_required_train_properties(run) -> None:
    """MONAI's required train properties, one by one, and ``check_properties()``."""
    required = [name for name, spec in TrainProperties.items() if spec.get("required")]
    assert "trainer" in required and all(getattr(run, name) is not None for name in required)
    assert run.check_properties() in (None, [])


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
    images = sampler(torch.randn(1, 3, 40, 56), decoder, context=embedding, uncond_context=null_context(embedding))
    assert images.shape == (1, 1, 80, 112) and torch.isfinite(images).all()


# --- prior, decoder and LoRA trained once for the inference tests -------------------------------------------------

TINY_PRIOR = {"prior_max_epochs": 1, "prior_batch_size": 4, "prior_width": 16, "prior_layers": 1, "prior_heads": 2}
TINY_DECODER = {"decoder_max_epochs": 1, "decoder_batch_size": 4}
FAST = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "progress": False, "batch_size": 2}
PROMPT = (
    "T1-weighted brain MRI, axial slice at z=+13 mm, 70-year-old subject; large lateral ventricles; "
    "grey matter 41%, white matter 43%, CSF 16%"
)


@pytest.fixture(scope="module")
def tiny_models(phantoms, tiny_clip) -> dict[str, str]:
    """Weight-file options of inference.json for a tiny CLIP, prior and decoder trained one epoch each."""
    folder = tiny_clip.parent
    stage = {k: v for k, v in TINY_CLIP.items() if not k.startswith(("clip_", "text_"))}
    for config, path_key, sizes in (("train_prior.json", "prior_path", TINY_PRIOR), ("train_decoder.json", "decoder_path", TINY_DECODER)):  # fmt: skip
        run = workflow(
            ["train_clip.json", config],
            "train",
            dataset_dir=str(phantoms),
            run_dir=str(folder / path_key),
            clip_weights_path=str(tiny_clip),
            install_weights=True,
            **{path_key: str(folder / f"{path_key}.pt")},
            **sizes,
            **stage,
        )
        run.run()
        run.finalize()
    return {
        "clip_weights_path": str(tiny_clip),
        "prior_path": str(folder / "prior_path.pt"),
        "decoder_path": str(folder / "decoder_path.pt"),
    }


@pytest.fixture(scope="module")
def tiny_lora(phantoms, tiny_models, tmp_path_factory) -> Path:
    """A LoRA adapter trained one epoch on the tiny decoder, on the phantoms' FLAIR slices (another contrast)."""
    folder = tmp_path_factory.mktemp("lora")
    run = workflow(
        ["train_clip.json", "train_decoder.json", "train_lora.json"],
        "train",
        dataset_dir=str(phantoms),
        run_dir=str(folder / "runs"),
        clip_weights_path=tiny_models["clip_weights_path"],
        decoder_path=tiny_models["decoder_path"],
        lora_install_path=str(folder / "lora.pt"),
        install_weights=True,
        demo_weights=True,
        image_key="flair",
        contrast="FLAIR",
        lora_max_epochs=2,
        lora_batch_size=4,
        **{k: v for k, v in TINY_CLIP.items() if not k.startswith(("clip_", "text_"))},
    )
    assert_required_train_properties(run)
    items = run.parser.get_parsed_content("training_items")
    assert all(item["image"].endswith("_FLAIR.nii.gz") for item in items)
    network = run.parser.get_parsed_content("network_def")
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable), "only the adapters train"
    run.run()
    run.finalize()
    return folder / "lora.pt"


def test_lora_stage_trains_cross_attention_adapters_and_saves_only_them(tiny_models, tiny_lora):
    from common.networks.lora import LoRASettings, cross_attention_targets, lora_base_fingerprint

    base = network_from_weights(load_weights(tiny_models["decoder_path"]), "decoder")
    adapter = load_weights(tiny_lora)
    assert set(adapter) == {"lora", "lora_settings", "base_fingerprint", "provenance"}
    assert adapter["provenance"]["demo"] is True
    settings = LoRASettings.from_dict(adapter["lora_settings"])
    assert (settings.rank, settings.alpha, settings.base) == (8, 8, "unet")
    assert list(settings.target_modules) == cross_attention_targets(base)
    assert adapter["base_fingerprint"] == lora_base_fingerprint(base)
    assert all(".lora_" in key for key in adapter["lora"])
    assert any(key.endswith("lora_B.weight") and tensor.abs().sum() > 0 for key, tensor in adapter["lora"].items()), (
        "the adapters trained (B starts at zero)"
    )
    assert tiny_lora.stat().st_size < Path(tiny_models["decoder_path"]).stat().st_size / 4


def _sidecars(folder: Path) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_inference_text_to_image_writes_slices_with_the_requested_facts(tiny_models, tmp_path):
    import nibabel as nib

    out = tmp_path / "out"
    workflow("inference.json", "infer", **tiny_models, **FAST, prompt=PROMPT, num_samples=2, output_dir=str(out)).run()
    sidecars = _sidecars(out)
    assert [s["seed"] for s in sidecars] == [0, 1] and {s["mode"] for s in sidecars} == {"text"}
    assert sidecars[0]["requested_facts"]["ventricle_size"] == "large"
    assert sidecars[0]["requested_facts"]["csf"] == 0.16
    assert set(sidecars[0]["weights"]) == {"clip", "prior", "decoder", "autoencoder"}
    assert sidecars[0]["prior_guidance_scale"] == 2.0 and sidecars[0]["decoder_guidance_scale"] == 3.0
    image = nib.load(next(out.glob("*.nii.gz")))
    assert image.shape == (80, 112) and image.header.get_zooms() == (2.0, 2.0)
    assert len(list(out.glob("*.png"))) == 2


def test_variations_and_interpolation_through_inference_json(tiny_models, phantoms, tmp_path):
    import nibabel as nib
    import numpy as np

    source = sorted((phantoms / "images").glob("*_T1w.nii.gz"))[0]
    variations = tmp_path / "variations"
    workflow(
        "inference.json", "infer", **tiny_models, **FAST, input_image=str(source), num_samples=2,
        output_dir=str(variations),
    ).run()  # fmt: skip
    sidecars = _sidecars(variations)
    assert [(s["mode"], s["seed"], s["source_slice"]) for s in sidecars] == [("variation", 0, 0), ("variation", 1, 0)]
    assert sidecars[0]["source"] == str(source) and sidecars[0]["requested_facts"] is None

    path = tmp_path / "interpolation"
    other = PROMPT.replace("large", "small").replace("70-year-old", "50-year-old")
    workflow(
        "inference.json", "infer", **tiny_models, **FAST, prompt=PROMPT, interpolate_to=other,
        interpolation_steps=3, output_dir=str(path),
    ).run()  # fmt: skip
    sidecars = sorted(_sidecars(path), key=lambda s: s["index"])
    assert [s["weight"] for s in sidecars] == [0.0, 0.5, 1.0]
    assert sidecars[0]["requested_facts_b"]["ventricle_size"] == "small"
    # the path starts at the text-to-image sample of the first prompt with the same seed
    start = tmp_path / "start"
    workflow(
        "inference.json", "infer", **tiny_models, **FAST, prompt=PROMPT, num_samples=1, output_dir=str(start)
    ).run()
    first = nib.load(next(path.glob("interpolation_0_of_2*.nii.gz"))).get_fdata()
    np.testing.assert_allclose(first, nib.load(next(start.glob("*.nii.gz"))).get_fdata(), atol=1e-4)


def test_a_lora_adapter_is_one_override_and_refused_on_another_decoder(tiny_models, tiny_lora, tmp_path):
    plain, adapted = tmp_path / "plain", tmp_path / "adapted"
    workflow("inference.json", "infer", **tiny_models, **FAST, num_samples=1, output_dir=str(plain)).run()
    workflow(
        "inference.json", "infer", **tiny_models, **FAST, num_samples=1, lora_path=str(tiny_lora),
        output_dir=str(adapted),
    ).run()  # fmt: skip
    (sidecar,) = _sidecars(adapted)
    assert sidecar["weights"]["lora"]["file"] == "lora.pt"
    import nibabel as nib

    images = [nib.load(next(folder.glob("*.nii.gz"))).get_fdata() for folder in (plain, adapted)]
    assert abs(images[0] - images[1]).max() > 1e-6, "the trained adapter changes the decoder's output"
    # the shipped decoder is not the one the adapter was trained on
    with pytest.raises(Exception) as info:
        workflow("inference.json", "infer", **FAST, lora_path=str(tiny_lora), output_dir=str(tmp_path / "x")).run()
    assert "adapts another unet" in error_text(info.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"input_image": "SLICE", "interpolate_to": "a brain"}, "not both"),
        ({"input_image": "/nonexistent.nii.gz"}, "Input T1w image not found"),
        ({"interpolation_steps": 1, "interpolate_to": "a brain"}, "interpolation_steps"),
        ({"prompt": ""}, "prompt` is empty"),
        ({"prior_guidance_scale": -1.0}, "`guidance_scale` must be >= 0"),
        ({"lora_path": "/nonexistent/lora.pt"}, "Weights file not found"),
    ],
)
def test_bad_inference_input_fails_before_writing(override, message, phantoms, tmp_path):
    source = str(sorted((phantoms / "images").glob("*_T1w.nii.gz"))[0])
    override = {k: source if v == "SLICE" else v for k, v in override.items()}
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        workflow("inference.json", "infer", **FAST, output_dir=str(out), **override).run()
    assert message in error_text(info.value)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written for bad input"


def test_a_slice_of_another_size_is_refused_with_the_sizes(tmp_path):
    import nibabel as nib
    import numpy as np

    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(64, 64).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    with pytest.raises(Exception) as info:
        workflow("inference.json", "infer", **FAST, input_image=str(path), output_dir=str(tmp_path / "out")).run()
    assert "has T1w slices of size (64, 64), but the model expects (80, 112)" in error_text(info.value)


def test_evaluate_scores_every_family_without_touching_the_bundle(tiny_models, phantoms):
    docs = BUNDLE / "docs" / "README.md"
    before = docs.read_bytes()
    run = workflow(
        ["inference.json", "evaluate.json"],
        "infer",
        **tiny_models,
        **FAST,
        dataset_dir=str(phantoms),
        eval_batch_size=2,
    )
    results = run.parser.get_parsed_content("evaluation").run()
    metrics = results["metrics"]
    for name in (
        "histogram_intersection", "jensen_shannon_divergence", "wasserstein_1", "ks_statistic", "glcm_frechet_distance",
        "clip_frechet_distance", "clip_mmd", "clip_precision", "clip_recall", "clip_score",
        "generated_text_to_image_recall_at_5", "clip_text_to_image_recall_at_5", "chance_recall_at_5",
        "memorisation_fraction_above_test_p95",
    ):  # fmt: skip
        assert name in metrics, name
    assert 0 <= metrics["histogram_intersection"] <= 1 and metrics["chance_recall_at_5"] == 1.0  # 4 test slices
    assert results["num_generated_samples"] == results["num_real_test_images"] == 4
    assert set(results["condition_adherence"]) == {"generated", "real_test_slices"}
    assert 0 < results["autoencoder_reconstruction"]["gray_levels"]["histogram_intersection"] <= 1
    assert docs.read_bytes() == before, "evaluation without --publish writes nothing into the bundle"


def test_shipped_inference_config_properties():
    assert workflow("inference.json", "infer").check_properties() in (None, [])


def test_shipped_demo_follows_the_requested_ventricle_size(tmp_path):
    """The README command with the shipped demo weights: large requested ventricles come out larger than small."""
    from monai.transforms import LoadImage

    from common.evaluation.brain_measures import measure_slice

    areas = {}
    for size in ("large", "small"):
        out = tmp_path / size
        result = subprocess.run(
            [
                sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                "--prompt", PROMPT.replace("large", size), "--seed", "0", "--output_dir", str(out),
                "--progress", "False", "--num_threads", "1",
            ],
            cwd=BUNDLE, env=bundle_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        slices = [LoadImage(image_only=True)(str(p)) for p in sorted(out.glob("*.nii.gz"))]
        assert len(slices) == 4 and all(s.shape == (80, 112) for s in slices)
        areas[size] = [measure_slice(s.numpy()).ventricle_area_mm2 for s in slices]
    assert min(areas["large"]) > max(areas["small"]), areas


def test_shipped_lora_adapter_belongs_to_the_shipped_decoder():
    from common.networks.lora import has_lora, load_lora

    decoder = network_from_weights(load_weights(BUNDLE / "models" / "decoder.pt"), "decoder")
    assert has_lora(load_lora(BUNDLE / "models" / "lora_flair.pt", decoder))
    assert load_weights(BUNDLE / "models" / "lora_flair.pt")["provenance"]["demo"] is True
    shipped = sum(p.stat().st_size for p in (BUNDLE / "models").glob("*.pt"))
    # 0.2.0's decoder has one more level for brain_t1_ldm 0.7.0's 40x56 latents: 25.0 MB in all
    assert shipped <= 26e6, f"demo weights must stay within 26 MB, got {shipped / 1e6:.1f} MB"


def test_lora_stage_under_torchrun_on_two_cpu_processes(phantoms, tiny_models, tmp_path):
    """The multi-GPU overlay on the LoRA stage (gloo): DDP over a decoder whose base is frozen; rank 0 exports."""
    import json

    from common.networks.lora import has_lora, load_lora

    configs = [str(BUNDLE / "configs" / c) for c in ("train_clip.json", "train_decoder.json", "train_lora.json")]
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
        "-m", "monai.bundle", "run", "--config_file", json.dumps([*configs, str(BUNDLE / "configs" / "multi_gpu_train.json")]),
        "--bundle_root", str(BUNDLE), "--dataset_dir", str(phantoms), "--run_dir", str(tmp_path / "runs"),
        "--clip_weights_path", tiny_models["clip_weights_path"], "--decoder_path", tiny_models["decoder_path"],
        "--lora_max_epochs", "1", "--lora_batch_size", "2", "--num_workers", "0", "--train_limit", "8",
        "--val_limit", "2", "--num_threads", "1",
    ]  # fmt: skip
    done = subprocess.run(args, cwd=REPO_ROOT, env=bundle_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    decoder = network_from_weights(load_weights(tiny_models["decoder_path"]), "decoder")
    assert has_lora(load_lora(tmp_path / "runs" / "lora.pt", decoder))
    assert sorted(p.name for p in (tmp_path / "runs").glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
