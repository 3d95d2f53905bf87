"""End-to-end tests of the cxr_ldm bundle configs on tiny chest X-ray phantoms (CPU, a few minutes in all).

The networks are trained here, one tiny epoch each, into temporary folders: the bundle's own ``models/`` is only
read (tokenizer, text encoder), never written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from common.data.cxr.phantoms import write_cxr_phantom_dataset
from common.io.weights import load_weights
from tests.helpers import REPO_ROOT
from tests.helpers.bundle_runs import (
    TINY_CLIP,
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
BUNDLE = REPO / "bundles" / "cxr_ldm"
CONFIGS = BUNDLE / "configs"
SHIPPED = BUNDLE / "models"
PY = sys.executable
TRAIN_LDM = ["train_autoencoder.json", "train_diffusion.json"]
EVAL = ["inference.json", "evaluate.json"]

TINY_AE = {
    "ae_max_epochs": 1,
    "ae_batch_size": 4,
    "num_workers": 0,
    "train_limit": 8,
    "val_limit": 2,
    "val_interval": 1,
}
TINY_LDM = {
    "ldm_max_epochs": 1,
    "ldm_batch_size": 4,
    "num_workers": 0,
    "train_limit": 8,
    "val_limit": 2,
    "val_interval": 1,
    "sample_steps": 2,
}
QUICK = {"num_inference_steps": 2, "progress": False}


def workflow(config, workflow_type, **overrides):
    return bundle_workflow(BUNDLE, config, workflow_type, **overrides)


def bundle_files() -> dict[Path, bytes]:
    """The bundle's files, less its (git-ignored) training runs."""
    return {p: b for p, b in snapshot(BUNDLE).items() if p.relative_to(BUNDLE).parts[0] != "runs"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """16 patients: 8 training, 4 validation and 4 test radiographs (128 x 128) with reports."""
    out = tmp_path_factory.mktemp("cxr_phantoms")
    write_cxr_phantom_dataset(
        out,
        num_patients=16,
        size="demo",
        seed=1,
        studies_per_patient=1,
        val_fraction=0.25,
        test_fraction=0.25,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return scratch_model_dir(SHIPPED, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def trained(phantoms, model_dir, tmp_path_factory) -> Path:
    """Autoencoder then diffusion, one tiny epoch each, through the shipped train configs, installed in model_dir."""
    train_tiny_latent_diffusion(BUNDLE, phantoms, model_dir, tmp_path_factory.mktemp("runs"), TINY_AE, TINY_LDM)
    return model_dir


@pytest.fixture(scope="module")
def classifier(phantoms, tmp_path_factory) -> Path:
    """A tiny finding classifier (one epoch, narrow network) in the layout evaluate.json reads."""
    from tools.train_finding_classifier import train_finding_classifier

    out = tmp_path_factory.mktemp("classifier") / "finding_classifier.pt"
    train_finding_classifier(
        str(phantoms),
        str(out),
        epochs=1,
        batch_size=8,
        channels=(8, 8, 8, 8),
        depths=(1, 1, 1, 1),
        augment=False,
        num_threads=1,
    )
    return out


# --------------------------------------------------------------------------------------------------- training


def test_training_prompts_are_report_excerpts(trained, phantoms, tmp_path):
    """Each training image is paired with 1 to 5 sentences of its own report, in report order; dropout empties them."""
    wf = workflow(
        TRAIN_LDM,
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(trained),
        run_dir=str(tmp_path),
        prompt_dropout=0.0,  # no prompt dropout: every prompt is an excerpt
        **TINY_LDM,
    )
    dataset = wf.parser.get_parsed_content("train#dataset")
    assert len(dataset) == 8
    counts = set()
    for _ in range(4):
        for i in range(len(dataset)):
            item = dataset[i]
            sentences = [s.strip() for s in dataset.data[i]["sentences"]]
            assert set(item) == {"prompt", "z_mu", "z_sigma"}, "cached latent moments replace the image"
            assert item["prompt"], "an excerpt is never empty for a report with sentences"
            # the excerpt is sentences of this entry's report, kept in order
            rest, used = item["prompt"], []
            for sentence in sentences:
                if rest.startswith(sentence):
                    used.append(sentence)
                    rest = rest[len(sentence) :].lstrip()
            assert not rest, f"{item['prompt']!r} is not made of sentences of its report"
            assert 1 <= len(used) <= 5
            counts.add(len(used))
    assert len(counts) > 1, "excerpt lengths vary"

    batch = next(iter(wf.parser.get_parsed_content("train#dataloader")))
    assert set(batch) <= {"image", "prompt", "z_mu", "z_sigma"} and "prompt" in batch

    everything_dropped = workflow(
        TRAIN_LDM,
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(trained),
        run_dir=str(tmp_path),
        prompt_dropout=1.0,
        **TINY_LDM,
    ).parser.get_parsed_content("train#dataset")
    assert [everything_dropped[i]["prompt"] for i in range(len(everything_dropped))] == [""] * 8


def test_text_encoder_stage_exports_the_trained_tower_that_the_diffusion_stage_reads(phantoms, tmp_path):
    """train_text_encoder.json trains a CLIP on radiographs and report excerpts and installs its text tower."""
    from common.networks.text_encoder import load_text_model

    models = scratch_model_dir(SHIPPED, tmp_path / "models")
    runs = tmp_path / "runs"
    configs = ["train_autoencoder.json", "train_text_encoder.json"]
    run = workflow(
        configs,
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(models),
        run_dir=str(runs),
        install_weights=True,
        demo_weights=True,
        clip_max_epochs=2,
        **TINY_CLIP,
    )
    assert run.check_properties() in (None, [])
    run.run()
    recall = run.parser.get_parsed_content("validate#evaluator").state.metrics["val_text_to_image_R@5"]
    run.finalize()
    assert 0.0 <= recall <= 1.0

    installed = models / "text_encoder.pt"
    assert (runs / "text_encoder.pt").read_bytes() == installed.read_bytes()
    weights = load_weights(installed)
    assert set(weights) == {"text_encoder", "architectures", "provenance"} and weights["provenance"]["demo"] is True
    tower = load_text_model(None, None, installed)
    assert tower.config.hidden_size == 16
    # the exported tower is the trained one: the last checkpoint's CLIP text half, not the initialisation
    checkpoint = torch.load(runs / "checkpoint_epoch=2.pt", weights_only=False)["clip"]
    trained = {
        k.removeprefix("model.text_model."): v for k, v in checkpoint.items() if k.startswith("model.text_model.")
    }
    assert trained.keys() == tower.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in tower.state_dict().items())
    initial = workflow(
        configs,
        "train",
        dataset_dir=str(phantoms),
        model_dir=str(models),
        run_dir=str(tmp_path / "x"),
        resume=False,
        **TINY_CLIP,
    )
    initial_tower = initial.parser.get_parsed_content("text_tower")
    assert not all(torch.equal(initial_tower.state_dict()[k], v) for k, v in tower.state_dict().items())

    # the diffusion stage conditions on the new tower: its context is the tower's width
    ldm = workflow(
        TRAIN_LDM, "train", dataset_dir=str(phantoms), model_dir=str(models), run_dir=str(tmp_path / "ldm"), **TINY_LDM
    )
    assert ldm.parser.get_parsed_content("context_dim") == 16
    assert ldm.parser.get_parsed_content("prompt_encoder")(["No pleural effusion."]).shape == (1, 77, 16)


# -------------------------------------------------------------------------------------------------- inference


def generate(model_dir: Path, out: Path, **overrides) -> list[Path]:
    wf = workflow("inference.json", "infer", model_dir=str(model_dir), output_dir=str(out), **{**QUICK, **overrides})
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()
    return sorted(out.iterdir())


def pixels(files: list[Path]) -> bytes:
    return next(p for p in files if p.name.endswith(".png") and not p.name.endswith("_16bit.png")).read_bytes()


def test_inference_is_deterministic_and_knobs_reach_the_sampler(trained, tmp_path):
    runs = {
        name: generate(trained, tmp_path / name, num_samples=1, seed=3, **knobs)
        for name, knobs in {
            "a": {},
            "b": {},
            "guidance_1": {"guidance_scale": 1.0},
            "other_prompt": {"prompt": "Large right pneumothorax."},
        }.items()
    }
    a, b = runs["a"], runs["b"]
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 3  # NIfTI, PNG, JSON
    for x, y in zip(a, b, strict=True):
        assert x.read_bytes() == y.read_bytes(), f"{x.name} differs between two runs with the same seed"
    assert pixels(runs["guidance_1"]) != pixels(a), "guidance 1.0 and 7.0 gave the same image"
    assert pixels(runs["other_prompt"]) != pixels(a), "two prompts gave the same image"
    sidecar = json.loads(next(p for p in a if p.suffix == ".json").read_text())
    assert sidecar["prompt"] == "Large left pleural effusion." and sidecar["seed"] == 3
    assert sidecar["guidance_scale"] == 7.0 and sidecar["num_inference_steps"] == 2
    assert sidecar["scheduler"] == "ddim" and sidecar["eta"] == 0.0
    assert sidecar["bundle"] == "cxr_ldm"
    assert json.loads(next(p for p in runs["guidance_1"] if p.suffix == ".json").read_text())["guidance_scale"] == 1.0


def test_output_formats_and_no_silent_overwrite(trained, tmp_path):
    out = tmp_path / "out"
    knobs = {"num_samples": 1, "output_formats": ["png", "png16", "nii.gz"]}
    files = generate(trained, out, **knobs)
    names = [p.name for p in files]
    assert len(files) == 4, names
    png8 = Image.open(next(p for p in files if p.name.endswith(".png") and not p.name.endswith("_16bit.png")))
    png16 = Image.open(next(p for p in files if p.name.endswith("_16bit.png")))
    assert png8.mode == "L" and png8.size == (128, 128)
    assert png16.mode in ("I;16", "I;16B", "I") and png16.size == (128, 128)
    a8, a16 = np.asarray(png8).astype(float), np.asarray(png16).astype(float)
    assert a16.max() > 255, "16-bit PNG uses the 16-bit range"
    assert np.abs(a16 / 257.0 - a8).max() <= 1.0, "8- and 16-bit PNGs show the same image"
    nii = nib.load(next(p for p in files if p.name.endswith(".nii.gz")))
    assert nii.shape == (128, 128)
    assert tuple(float(z) for z in nii.header.get_zooms()) == pytest.approx((2.8, 2.8))
    sidecar = json.loads(next(p for p in files if p.suffix == ".json").read_text())
    assert sorted(sidecar["files"]) == sorted(n for n in names if not n.endswith(".json"))

    written = snapshot(out)
    with pytest.raises(Exception) as info:
        generate(trained, out, **knobs)
    assert "exist already" in error_text(info.value)
    assert snapshot(out) == written
    generate(trained, out, overwrite=True, **knobs)
    assert snapshot(out) == written, "the same request with overwrite gives the same bytes"


# ------------------------------------------------------------------------------------------------- evaluation


def quick_evaluation(models: Path, phantoms: Path, classifier: Path):
    """evaluate.json on 4 test images, 2 steps, one stated and one negated pleural-effusion prompt."""
    return workflow(
        EVAL,
        "infer",
        model_dir=str(models),
        dataset_dir=str(phantoms),
        finding_classifier_path=str(classifier),
        test_limit=4,
        eval_num_samples=4,
        eval_batch_size=4,
        eval_num_inference_steps=2,
        adherence_samples_per_prompt=1,
        adherence_prompts={
            "pleural_effusion": {"stated": ["Large left pleural effusion."], "negated": ["No pleural effusion."]}
        },
    )


def test_evaluate_reports_fidelity_diversity_fid_and_adherence(trained, phantoms, classifier):
    before = bundle_files()
    wf = quick_evaluation(trained, phantoms, classifier)
    results = wf.parser.get_parsed_content("evaluation").run()
    metrics = results["metrics"]
    assert 0 <= metrics["reconstruction_ms_ssim_test"] <= 1
    assert metrics["reconstruction_psnr_test"] > 0
    assert 0 <= metrics["sample_diversity_ms_ssim"] <= 1 and 0 <= metrics["real_diversity_ms_ssim_test"] <= 1
    assert metrics["fid"] >= 0
    assert metrics["adherence_auroc_pleural_effusion"] in (0.0, 0.5, 1.0)  # one stated and one negated image
    assert not any(k.startswith("adherence_auroc_") and "cardiomegaly" in k for k in metrics)
    assert results["num_real_test_images"] == 4 and results["num_generated_samples"] == 4
    adherence = results["condition_adherence"]
    assert set(adherence["per_prompt"]["pleural_effusion"]) == {"Large left pleural effusion.", "No pleural effusion."}
    assert set(results["provenance"]["weights"]) == {"autoencoder", "diffusion_model", "text_encoder"}
    # one sample per test report, with the inference defaults (guidance 7), judged by FID and the classifier
    captioned = results["captioned_generation"]
    assert captioned["num_samples"] == 4 and captioned["guidance_scale"] == 7.0
    assert metrics["captioned_fid"] >= 0 and 0 <= metrics["captioned_diversity_ms_ssim"] <= 1
    real = captioned["condition_adherence"]["real_test_images"]
    assert set(real["auroc"]) == set(captioned["condition_adherence"]["generated"]["auroc"])
    assert bundle_files() == before, "evaluation without --publish must leave the bundle as it was"


def test_guidance_distillation_makes_the_student_inference_and_adherence_sample_with(
    trained, phantoms, classifier, tmp_path
):
    """distill_guidance.json makes a student that inference samples with at guidance 7 (``distil_and_sample``); the
    adherence images (guidance 7) come from it too, the unconditional ones from the teacher."""
    models = distil_and_sample(BUNDLE, trained, phantoms, tmp_path, TINY_LDM, scale=7.0)
    wf = quick_evaluation(models, phantoms, classifier)
    evaluation = wf.parser.get_parsed_content("evaluation")
    assert evaluation.network is wf.parser.get_parsed_content("base_network")
    assert evaluation.adherence.network is wf.parser.get_parsed_content("network")
    results = evaluation.run()
    assert results["condition_adherence"]["distilled_guidance"] == 7.0
    assert results["captioned_generation"]["distilled_guidance"] == 7.0
    assert {"diffusion_model", "diffusion_model_distilled"} <= set(results["provenance"]["weights"])


# ---------------------------------------------------------------------------------------------- configuration


def test_full_size_overlay_builds_reference_networks(tmp_path):
    """full_size.json: the article's autoencoder and UNet, cross-attention as wide as the OpenCLIP text tower."""
    from monai.bundle import ConfigParser
    from transformers import CLIPTextConfig, CLIPTextModel

    # a stand-in for models/openclip_vit_h14_text: the width of ViT-H/14's text tower (1024), one layer, tiny vocab
    text = tmp_path / "openclip_vit_h14_text"
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=1024,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    CLIPTextModel(config).save_pretrained(text)

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in [*TRAIN_LDM, "full_size.json"]])
    parser["bundle_root"] = str(BUNDLE)
    assert parser["text_encoder"] == "$@bundle_root + '/models/openclip_vit_h14_text'"
    assert parser["text_hidden_layer"] == -2
    parser["text_encoder"] = str(text)
    assert parser.get_parsed_content("image_size") == [512, 512]

    # the arguments of the network definitions, references resolved (the text tower is loaded for its width)
    ae_args = parser.get_parsed_content("autoencoder_def", instantiate=False, lazy=False).get_config()
    assert list(ae_args["channels"]) == [64, 128, 128, 128] and ae_args["latent_channels"] == 3
    assert ae_args["num_res_blocks"] == 2
    unet_args = parser.get_parsed_content("network_def", instantiate=False).get_config()
    assert list(unet_args["channels"]) == [256, 512, 768]
    assert unet_args["cross_attention_dim"] == 1024, "the UNet reads the text tower's width"
    assert list(unet_args["num_head_channels"]) == [0, 512, 768] and unet_args["num_res_blocks"] == 2
    assert unet_args["in_channels"] == unet_args["out_channels"] == 3

    # and the networks build: the autoencoder for real (x8 downsampling), the UNet on the meta device (no 1 GB)
    parser.parse(reset=True)
    ae = parser.get_parsed_content("autoencoder_def")
    z = ae.encode_stage_2_inputs(torch.zeros(1, 1, 64, 64))
    assert tuple(z.shape) == (1, 3, 8, 8), "512 x 512 images -> 3 x 64 x 64 latents"
    assert parser.get_parsed_content("context_dim") == 1024  # the text tower loads outside the meta device
    with torch.device("meta"):
        unet = parser.get_parsed_content("network_def")
    assert tuple(unet.block_out_channels) == (256, 512, 768)
    assert sum(p.numel() for p in unet.parameters()) > 100_000_000


# -------------------------------------------------------------------------------------------------- bad input


LONG_PROMPT = "Large left pleural effusion. " * 40  # 1160 characters


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--guidance_scal", "3"],
            "--guidance_scal: no such option in configs/inference.json. Did you mean --guidance_scale",
        ),
        (["--prompt", LONG_PROMPT], "not allowed. Give text of at most 1000 characters"),
    ],
    ids=["misspelt-option", "long-prompt"],
)
def test_bad_command_line_is_refused_before_work(args, message, tmp_path):
    out = tmp_path / "out"
    cmd = [PY, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--output_dir", str(out)]
    done = subprocess.run(cmd + args, cwd=BUNDLE, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert message in last, done.stderr[-3000:]
    assert not out.exists()


def test_long_prompt_is_refused_in_python_before_writing(trained, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        generate(trained, out, prompt=LONG_PROMPT)
    assert "more than the 1000 accepted" in error_text(info.value)
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------------ resume


def test_diffusion_training_killed_midway_resumes_from_last_checkpoint(trained, phantoms, tmp_path):
    run_dir = tmp_path / "run"
    args = [PY, "-m", "monai.bundle", "run", "--config_file", json.dumps([str(CONFIGS / c) for c in TRAIN_LDM])]
    args += ["--bundle_root", str(BUNDLE), "--dataset_dir", str(phantoms), "--model_dir", str(trained)]
    args += ["--run_dir", str(run_dir), "--ldm_max_epochs", "3", "--ldm_batch_size", "4", "--num_workers", "0"]
    args += ["--train_limit", "8", "--val_limit", "2", "--val_interval", "10"]
    installed = (trained / "diffusion_model.pt").read_bytes()
    kill_at_checkpoint(args, run_dir / "checkpoint_epoch=1.pt")
    assert not (run_dir / "diffusion_model.pt").exists(), "a killed run must not export final weights"
    done = subprocess.run(args, cwd=REPO, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "Restored all variables from" in log and "checkpoint_epoch=" in log, log[-2000:]
    assert "Epoch[1] Complete" not in log and "Epoch[3] Complete" in log
    assert "given or resumed" in log, "the resumed run keeps its latent scale factor"
    weights = load_weights(run_dir / "diffusion_model.pt")
    assert weights["latent"]["scale_factor"] > 0
    assert (trained / "diffusion_model.pt").read_bytes() == installed, "training installs weights only when asked"


# ----------------------------------------------------------------------------------------- shipped demo weights


def test_shipped_demo_from_the_bundle_folder(tmp_path):
    """The README's command writes a radiograph in which the stated effusion shows, and a negated one does not.

    "Shows" is judged by the shipped phantom finding classifier on the written 8-bit PNG, read back as a user would.
    """
    from common.data.cxr.transforms import LoadRadiographd
    from common.evaluation.findings import FindingClassifier

    before = bundle_files()
    probability = {}
    for prompt in ("Large left pleural effusion.", "No pleural effusion."):
        out = tmp_path / prompt.split()[0]
        cmd = [PY, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
        cmd += ["--prompt", prompt, "--seed", "0", "--output_dir", str(out), "--num_samples", "1"]
        done = subprocess.run(cmd, cwd=BUNDLE, env=bundle_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        png = next(p for p in out.iterdir() if p.suffix == ".png")
        assert Image.open(png).size == (128, 128)
        sidecar = json.loads(next(p for p in out.iterdir() if p.suffix == ".json").read_text())
        assert sidecar["prompt"] == prompt and sidecar["seed"] == 0
        image = LoadRadiographd(keys="image")({"image": str(png)})["image"]
        classifier = FindingClassifier.from_weights(SHIPPED / "finding_classifier.pt")
        probability[prompt] = float(classifier(image[None])[0, classifier.findings.index("pleural_effusion")])
    assert probability["Large left pleural effusion."] > 0.5 > probability["No pleural effusion."], probability
    assert bundle_files() == before


def test_shipped_inference_config_properties():
    assert workflow("inference.json", "infer").check_properties() in (None, [])
