"""tools.release.verify (verify-bundles): passes for the shipped bundles, and names the cause when one rule is broken
(on a temporary copy of the bundle)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from common.io.weights import load_weights
from tests.helpers.bundle_copy import REPO_ROOT, copy_bundle, edit_json
from tools.release.verify import DeclarationError, compare_output, make_example, verify_bundles

NAME = "brain_t1_ldm"


def _verify(bundles_dir: Path, **kwargs):
    lines: list[str] = []
    report = verify_bundles(bundles_dir=str(bundles_dir), echo=lines.append, **kwargs)
    return report, lines


def _text(report) -> str:
    return "\n".join(str(p) for p in report.problems)


@pytest.fixture
def bundles(tmp_path) -> Path:
    copy_bundle(tmp_path / "bundles")
    return tmp_path / "bundles"


def test_shipped_bundle_passes_every_check():
    lines: list[str] = []
    report = verify_bundles(bundles=NAME, echo=lines.append)
    assert report.ok, _text(report)
    checked = " ".join(lines)
    for label in ("metadata", "large files", "properties", "network autoencoder", "network network_def"):
        assert f"{NAME}: {label}" in checked
    assert "network text_model" in checked and "network discriminator_def" in checked


def test_tensor_field_removed_from_metadata(bundles):
    meta = bundles / NAME / "configs" / "metadata.json"
    edit_json(meta, lambda m: m["network_data_format"]["inputs"]["noise"].pop("spatial_shape"))
    report, lines = _verify(bundles, checks="metadata")
    assert not report.ok
    assert (
        f"{NAME}: configs/metadata.json: network_data_format.inputs.noise.spatial_shape: required field is missing"
        in _text(report)
    )
    assert f"{NAME}: metadata: FAILED (1)" in lines[0]
    done = subprocess.run(
        [sys.executable, "tools/verify_bundles.py", "--bundles_dir", str(bundles), "--checks", "metadata"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "network_data_format.inputs.noise.spatial_shape: required field is missing" in done.stderr


def test_version_not_in_changelog(bundles):
    edit_json(bundles / NAME / "configs" / "metadata.json", lambda m: m.update(version="9.9.9"))
    report, _ = _verify(bundles, checks="metadata")
    assert f"{NAME}: configs/metadata.json: changelog: has no entry for version '9.9.9'" in _text(report)


UNET_DEF = {
    "_target_": "common.networks.architecture.build_network",
    "network": "DiffusionModelUNet",
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 3,
    "channels": [32, 64, 64],
    "attention_levels": [False, True, True],
    "num_head_channels": [0, 32, 32],
    "num_res_blocks": 1,
    "with_conditioning": True,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}


def test_network_whose_output_channels_change(bundles):
    """MONAI's verify_net_in_out catches it (the UNet has one image input and one tensor output)."""
    edit_json(
        bundles / NAME / "configs" / "inference.json", lambda c: c.update(network_def={**UNET_DEF, "out_channels": 4})
    )
    edit_json(bundles / NAME / "configs" / "verify.json", lambda d: d["networks"]["network_def"].pop("weights"))
    report, _ = _verify(bundles, checks="networks", networks="network_def")
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert (problem.bundle, problem.subject) == (NAME, "network network_def")
    assert "monai verify_net_in_out failed" in problem.reason and "output channel number `4`" in problem.reason


def test_network_whose_output_structure_changes(bundles):
    """The declared outputs catch what verify_net_in_out cannot express (a list of feature maps)."""
    train = bundles / NAME / "configs" / "train_autoencoder.json"
    edit_json(train, lambda c: c.update(discriminator_layers=2))
    report, _ = _verify(bundles, checks="networks", networks="discriminator_def")
    assert (
        f"{NAME}: network discriminator_def: outputs differ from configs/verify.json: output: 4 items, declared 5"
        in _text(report)
    )


def test_network_whose_output_shape_changes(bundles):
    edit_json(
        bundles / NAME / "configs" / "verify.json",
        lambda d: d["networks"]["autoencoder"]["inputs"]["x"].update(shape=[1, 1, 64, 112]),
    )
    report, _ = _verify(bundles, checks="networks", networks="autoencoder")
    assert "network autoencoder: outputs differ" in _text(report)
    assert "output[0]: shape [1, 1, 64, 112], declared [1, 1, 80, 112]" in _text(report)


def test_weights_that_do_not_fit_the_config(bundles):
    edit_json(
        bundles / NAME / "configs" / "inference.json",
        lambda c: c.update(network_def={**UNET_DEF, "channels": [32, 64, 128], "num_head_channels": [0, 32, 32]}),
    )
    report, _ = _verify(bundles, checks="networks", networks="network_def")
    assert "network network_def: building and running the network failed" in _text(report)
    assert "weights models/diffusion_model.pt do not fit the config's network" in _text(report)


def test_large_file_whose_sha_mismatches(bundles):
    path = bundles / NAME / "large_files.yml"
    config = yaml.safe_load(path.read_text())
    config["large_files"].append(
        {
            "path": "models/autoencoder.pt",
            "url": "https://example.org/ae.pt",
            "hash_val": "0" * 64,
            "hash_type": "sha256",
        }
    )
    path.write_text(yaml.safe_dump(config))
    report, _ = _verify(bundles, checks="large_files")
    assert f"{NAME}: large_files.yml: models/autoencoder.pt: sha256 mismatch" in _text(report)
    config["large_files"][-1]["hash_val"] = (
        __import__("hashlib").sha256((bundles / NAME / "models" / "autoencoder.pt").read_bytes()).hexdigest()
    )
    path.write_text(yaml.safe_dump(config))
    assert _verify(bundles, checks="large_files")[0].ok


def test_missing_inference_property(bundles):
    config = bundles / NAME / "configs" / "inference.json"
    edit_json(config, lambda c: c.pop("inferer"))
    edit_json(
        bundles / NAME / "configs" / "verify.json",
        lambda d: d["properties"].update(configs={"configs/inference.json": "infer"}),
    )
    report, _ = _verify(bundles, checks="properties")
    assert f"{NAME}: configs/inference.json:" in _text(report) and "inferer" in _text(report)


def test_missing_declaration(bundles):
    (bundles / NAME / "configs" / "verify.json").unlink()
    report, _ = _verify(bundles, checks="networks")
    assert f"{NAME}: configs/verify.json: configs/verify.json is missing" in _text(report)


# The declaration format: ControlNet and a UNet fed by its residuals ------------------------------------

CONTROLNET_CONFIG = {
    "bundle_root": ".",
    "controlnet_def": {
        "_target_": "ControlNet",
        "spatial_dims": 2,
        "in_channels": 3,
        "channels": [8, 8],
        "attention_levels": [False, True],
        "num_head_channels": [0, 8],
        "num_res_blocks": 1,
        "with_conditioning": True,
        "cross_attention_dim": 16,
        "norm_num_groups": 8,
        "conditioning_embedding_in_channels": 1,
        "conditioning_embedding_num_channels": [8, 8],
    },
    "network_def": {
        "_target_": "DiffusionModelUNet",
        "spatial_dims": 2,
        "in_channels": 3,
        "out_channels": 3,
        "channels": [8, 8],
        "attention_levels": [False, True],
        "num_head_channels": [0, 8],
        "num_res_blocks": 1,
        "with_conditioning": True,
        "cross_attention_dim": 16,
        "norm_num_groups": 8,
    },
}
RESIDUALS = [{"shape": [1, 8, 16, 16]}, {"shape": [1, 8, 16, 16]}, {"shape": [1, 8, 8, 8]}, {"shape": [1, 8, 8, 8]}]
CONTROLNET_DECLARATION = {
    "networks": {
        "controlnet_def": {
            "weights": "models/controlnet.pt",
            "key": "controlnet",
            "inputs": {
                "x": {"shape": [1, 3, 16, 16]},
                "timesteps": {"shape": [1], "dtype": "int64", "high": 1000},
                "controlnet_cond": {"shape": [1, 1, 32, 32]},
                "conditioning_scale": 1.0,
                "context": {"shape": [1, 77, 16]},
            },
            "outputs": [RESIDUALS, {"shape": [1, 8, 8, 8]}],
            "torchscript": "trace",
        },
        "network_def": {
            "inputs": {
                "x": {"shape": [1, 3, 16, 16]},
                "timesteps": {"shape": [1], "dtype": "int64", "high": 1000},
                "context": {"shape": [1, 77, 16]},
                "down_block_additional_residuals": RESIDUALS,
                "mid_block_additional_residual": {"shape": [1, 8, 8, 8]},
            },
            "outputs": {"shape": [1, 3, 16, 16]},
            "torchscript": "trace",
        },
    }
}


@pytest.fixture
def controlnet_bundle(tmp_path) -> Path:
    folder = tmp_path / "bundles" / "tiny_controlnet"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "metadata.json").write_text(
        (REPO_ROOT / "bundles" / NAME / "configs" / "metadata.json").read_text()
    )
    (folder / "configs" / "inference.json").write_text(json.dumps(CONTROLNET_CONFIG))
    (folder / "configs" / "verify.json").write_text(json.dumps(CONTROLNET_DECLARATION))
    return folder


def test_controlnet_and_residual_unet_declaration(controlnet_bundle):
    report, lines = _verify(controlnet_bundle.parent, checks="networks")
    assert report.ok, _text(report)
    assert len(lines) == 2 and all(": ok" in line for line in lines)
    assert any("models/controlnet.pt not found locally" in n for n in report.notes)


def test_controlnet_residual_shape_is_checked(controlnet_bundle):
    declaration = json.loads(json.dumps(CONTROLNET_DECLARATION))
    declaration["networks"]["controlnet_def"]["outputs"][0][2] = {"shape": [1, 8, 4, 4]}
    (controlnet_bundle / "configs" / "verify.json").write_text(json.dumps(declaration))
    report, _ = _verify(controlnet_bundle.parent, checks="networks", networks="controlnet_def")
    assert "tiny_controlnet: network controlnet_def: outputs differ" in _text(report)
    assert "output[0][2]: shape [1, 8, 8, 8], declared [1, 8, 4, 4]" in _text(report)


def test_declaration_errors_name_the_entry():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(DeclarationError, match=r"networks.n.inputs.t: an integer tensor needs 'high'"):
        make_example({"shape": [1], "dtype": "int64"}, generator, "networks.n.inputs.t")
    with pytest.raises(DeclarationError, match="unknown dtype 'float33'"):
        make_example({"shape": [1], "dtype": "float33"}, generator, "x")
    assert make_example(0.5, generator, "s").ndim == 0
    assert [t.shape for t in make_example([{"shape": [1, 2]}, {"shape": [3]}], generator, "l")] == [(1, 2), (3,)]
    assert compare_output({"a": torch.zeros(1)}, {"b": {"shape": [1]}}) == ["output: outputs ['a'], declared ['b']"]


def test_shipped_weights_that_do_not_belong_together(bundles):
    """A bundle whose diffusion model was trained on another autoencoder fails verification."""
    path = bundles / NAME / "models" / "autoencoder.pt"
    weights = load_weights(path)
    key = next(k for k in weights["autoencoder"] if k.startswith("encoder."))
    weights["autoencoder"][key] = weights["autoencoder"][key] * 1.01
    torch.save(weights, path)
    report, _ = _verify(bundles, checks="properties")
    assert "was trained with another autoencoder" in _text(report)


def test_torchscript_dir_keeps_the_checked_exports_that_load_and_run(controlnet_bundle, tmp_path):
    report, _ = _verify(controlnet_bundle.parent, checks="networks", torchscript_dir=str(tmp_path / "ts"))
    assert report.ok, _text(report)
    files = sorted(p.relative_to(tmp_path / "ts").as_posix() for p in (tmp_path / "ts").rglob("*.ts"))
    assert len(files) == 2 and all(f.startswith("tiny_controlnet/") for f in files)
    assert all(isinstance(torch.jit.load(str(tmp_path / "ts" / f)), torch.jit.ScriptModule) for f in files)
