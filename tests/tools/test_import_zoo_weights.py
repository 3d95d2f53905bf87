"""import-zoo-weights: the zoo's old-format files become this project's weight files, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.io.weights import load_weights, sha256sum
from common.networks.architecture import build_network, load_network
from common.networks.pairing import check_dependencies, fingerprint
from common.networks.zoo_import import CXR_SCALE_FACTOR, CXR_SCHEDULER, ConversionError
from tests.helpers import REPO_ROOT
from tools.import_zoo_weights import cli

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "zoo_cxr"
ARCHITECTURE = json.loads((FIXTURE / "architecture.json").read_text())
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def tiny_args(unet_args: dict | None = None) -> list[str]:
    """The fixture's architecture, passed as JSON text the way a user types it (JSON's false, not Python's)."""
    unet_args = unet_args or ARCHITECTURE["unet"]
    return ["--autoencoder_args", json.dumps(ARCHITECTURE["autoencoder"]), "--unet_args", json.dumps(unet_args)]


def run(
    output_dir: Path, *extra: str, autoencoder: Path = FIXTURE / "autoencoder.pth", unet_args: dict | None = None
) -> None:
    """``import-zoo-weights`` on the fixture files, with the fixture's architecture."""
    sources = ["--autoencoder", str(autoencoder), "--diffusion_model", str(FIXTURE / "diffusion_model.pth")]
    cli([*sources, "--output_dir", str(output_dir), *tiny_args(unet_args), *extra])


def write_text_encoder(path: Path, hidden_size: int = 12, vocab_size: int = 64) -> torch.nn.Module:
    """A tiny text encoder file in this project's format; ``hidden_size`` 12 fits the fixture UNet's context."""
    torch.manual_seed(0)
    network = build_network(
        "CLIPTextModel", hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab_size
    )
    torch.save(
        {"text_encoder": network.state_dict(), "architectures": {"text_encoder": network.architecture.to_dict()}}, path
    )
    return network


@torch.no_grad()
def test_converted_files_load_and_reproduce_the_old_outputs(tmp_path):
    text_encoder = write_text_encoder(tmp_path / "text_encoder.pt")
    run(tmp_path / "out", "--text_encoder", str(tmp_path / "text_encoder.pt"))
    ae_path, dm_path = tmp_path / "out" / "autoencoder.pt", tmp_path / "out" / "diffusion_model.pt"
    outputs = torch.load(FIXTURE / "outputs.pt", weights_only=True)

    autoencoder = load_network(ae_path, "autoencoder").eval()
    case = outputs["autoencoder"]
    z_mu, z_sigma = autoencoder.encode(case["image"])
    torch.testing.assert_close(z_mu, case["z_mu"], **TOLERANCE)
    torch.testing.assert_close(z_sigma, case["z_sigma"], **TOLERANCE)
    torch.testing.assert_close(autoencoder.reconstruct(case["image"]), case["reconstruction"], **TOLERANCE)

    unet = load_network(dm_path, "unet").eval()
    case = outputs["unet"]
    prediction = unet(case["x"], timesteps=case["timesteps"], context=case["context"])
    torch.testing.assert_close(prediction, case["prediction"], **TOLERANCE)

    weights = load_weights(dm_path)
    assert weights["latent"] == {"scale_factor": CXR_SCALE_FACTOR}
    assert weights["scheduler"] == CXR_SCHEDULER
    sources = {"autoencoder": FIXTURE / "autoencoder.pth", "diffusion_model": FIXTURE / "diffusion_model.pth"}
    assert weights["provenance"] == {
        "demo": False,
        "source": "MONAI Model Zoo cxr_image_synthesis_latent_diffusion_model",
        "source_sha256": {name: sha256sum(path) for name, path in sources.items()},
    }
    assert load_weights(ae_path)["provenance"] == weights["provenance"]
    assert weights["depends_on"] == {
        "autoencoder": fingerprint("autoencoder", autoencoder),
        "text_encoder": fingerprint("text_encoder", text_encoder),
    }
    check_dependencies(weights, dm_path, autoencoder=autoencoder, text_encoder=text_encoder)


def test_a_zoo_bundle_folder_is_read_and_existing_files_are_only_replaced_when_asked(tmp_path):
    zoo = tmp_path / "cxr_image_synthesis_latent_diffusion_model"
    (zoo / "models").mkdir(parents=True)
    for name in ("autoencoder.pth", "diffusion_model.pth"):
        shutil.copy(FIXTURE / name, zoo / "models" / name)
    # The architecture as the zoo bundle's configs/inference.json declares it (old class, old argument names).
    config = zoo / "configs" / "inference.json"
    config.parent.mkdir()
    config.write_text(
        json.dumps(
            {
                "autoencoder_def": {
                    "_target_": "generative.networks.nets.AutoencoderKL",
                    **ARCHITECTURE["autoencoder"],
                },
                "diffusion_def": {"_target_": "generative.networks.nets.DiffusionModelUNet", **ARCHITECTURE["unet"]},
            }
        )
    )
    out = tmp_path / "out"
    zoo_args = ["--zoo_dir", str(zoo), "--output_dir", str(out), "--autoencoder_args", str(config)]
    zoo_args += ["--unet_args", str(config)]
    cli(zoo_args)
    assert "text_encoder" not in load_weights(out / "diffusion_model.pt")["depends_on"]
    assert load_network(out / "autoencoder.pt", "autoencoder").architecture.args["channels"] == [8, 8, 16]
    before = {path: path.read_bytes() for path in out.iterdir()}

    with pytest.raises(FileExistsError, match="--overwrite") as err:
        cli(zoo_args)
    assert str(out / "autoencoder.pt") in str(err.value) and str(out / "diffusion_model.pt") in str(err.value)
    assert {path: path.read_bytes() for path in out.iterdir()} == before

    cli([*zoo_args, "--overwrite"])
    assert sorted(path.name for path in out.iterdir()) == ["autoencoder.pt", "diffusion_model.pt"]


def test_an_already_converted_file_is_refused_and_nothing_is_written(tmp_path):
    run(tmp_path / "first")
    with pytest.raises(ConversionError, match="already converted"):
        run(tmp_path / "second", autoencoder=tmp_path / "first" / "autoencoder.pt")
    assert not (tmp_path / "second").exists()


def test_a_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*cxr_image_synthesis_latent_diffusion_model"):
        run(tmp_path / "out", autoencoder=tmp_path / "missing.pth")


def test_another_architecture_is_refused_with_the_key_and_shapes(tmp_path):
    unet_args = {**ARCHITECTURE["unet"], "num_channels": [8, 16, 16]}
    expected = (
        r"first mismatching key 'down_blocks\.1\.attentions\.0\.norm\.weight' has shape \(8,\) in the old weights"
    )
    with pytest.raises(ConversionError, match=expected + r" and \(16,\) in the architecture"):
        run(tmp_path / "out", unet_args=unet_args)
    assert not (tmp_path / "out").exists()


def test_a_text_encoder_of_another_width_is_refused(tmp_path):
    write_text_encoder(tmp_path / "text_encoder.pt", hidden_size=8)
    with pytest.raises(ConversionError, match="8-wide embeddings"):
        run(tmp_path / "out", "--text_encoder", str(tmp_path / "text_encoder.pt"))


def test_converted_weights_run_through_the_bundles_full_size_inference(tmp_path):
    """The conversion's purpose: cxr_ldm's inference.json + full_size.json samples from the converted files."""
    from tests.helpers.bundle_runs import workflow

    write_text_encoder(tmp_path / "text_encoder.pt", hidden_size=12, vocab_size=49408)  # the real tokenizer's ids
    run(tmp_path / "full_size", "--text_encoder", str(tmp_path / "text_encoder.pt"))
    bundle = REPO_ROOT / "bundles" / "cxr_ldm"
    out = tmp_path / "generated"
    inference = workflow(
        bundle,
        ["inference.json", "full_size.json"],
        "infer",
        autoencoder_path=str(tmp_path / "full_size" / "autoencoder.pt"),
        diffusion_path=str(tmp_path / "full_size" / "diffusion_model.pt"),
        text_encoder=None,
        text_encoder_path=str(tmp_path / "text_encoder.pt"),
        text_hidden_layer=-1,
        image_size=[32, 32],
        num_samples=1,
        num_inference_steps=3,
        output_dir=str(out),
        progress=False,
    )
    inference.initialize()
    assert inference.parser.get_parsed_content("guidance_scale") == 7.0  # the article's, from full_size.json
    assert inference.parser.get_parsed_content("latent_space").scale_factor == CXR_SCALE_FACTOR
    inference.run()
    inference.finalize()
    (sidecar,) = out.glob("*.json")
    record = json.loads(sidecar.read_text())
    assert record["guidance_scale"] == 7.0 and record["prompt"] == "Large left pleural effusion."
    assert {Path(name).suffix for name in record["files"]} == {".gz", ".png"}
