"""common.networks.zoo_import: old monai-generative weights become MONAI-core networks that compute the same outputs.

The fixture (tests/fixtures/zoo_cxr, made by tools/make_zoo_weights_fixture.py with monai-generative 0.2.3) holds
tiny old networks with every weight random, and their outputs on fixed inputs.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
import torch

from common.networks.architecture import build_network
from common.networks.zoo_import import (
    CXR_AUTOENCODER_ARGS,
    CXR_SCHEDULER,
    CXR_UNET_ARGS,
    ConversionError,
    autoencoder_from_old,
    core_args,
    unet_from_old,
)
from tests.helpers import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "zoo_cxr"
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@functools.cache
def _old_state(filename: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / filename, weights_only=True)


def old_state(filename: str) -> dict[str, torch.Tensor]:
    """A fresh copy of an old state dict of the fixture (tests may edit it)."""
    return dict(_old_state(filename))


@functools.cache
def outputs() -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(FIXTURE / "outputs.pt", weights_only=True)


@functools.cache
def architecture() -> dict[str, Any]:
    return json.loads((FIXTURE / "architecture.json").read_text())


@torch.no_grad()
def assert_autoencoder_reproduces(network: torch.nn.Module) -> None:
    case = outputs()["autoencoder"]
    z_mu, z_sigma = network.encode(case["image"])
    torch.testing.assert_close(z_mu, case["z_mu"], **TOLERANCE)
    torch.testing.assert_close(z_sigma, case["z_sigma"], **TOLERANCE)
    torch.testing.assert_close(network.reconstruct(case["image"]), case["reconstruction"], **TOLERANCE)


@torch.no_grad()
def assert_unet_reproduces(network: torch.nn.Module, case_name: str) -> None:
    case = outputs()[case_name]
    prediction = network(case["x"], timesteps=case["timesteps"], context=case.get("context"))
    torch.testing.assert_close(prediction, case["prediction"], **TOLERANCE)


def test_autoencoder_with_attention_reproduces_the_old_outputs():
    network = autoencoder_from_old(old_state("autoencoder.pth"), architecture()["autoencoder"])
    assert_autoencoder_reproduces(network)
    # The record travels: channels in MONAI-core names, and no output projection, as the old blocks applied none.
    assert network.architecture.network == "AutoencoderKL"
    assert network.architecture.args["channels"] == [8, 8, 16]
    assert network.architecture.args["include_fc"] is False


def test_an_autoencoder_asked_for_output_projections_gets_identities():
    network = autoencoder_from_old(old_state("autoencoder.pth"), {**architecture()["autoencoder"], "include_fc": True})
    assert_autoencoder_reproduces(network)
    projection = network.encoder.blocks[4].attn.out_proj
    torch.testing.assert_close(projection.weight, torch.eye(8))
    torch.testing.assert_close(projection.bias, torch.zeros(8))


def test_copying_proj_attn_into_out_proj_would_change_the_outputs():
    """What MONAI 1.6.1's load_old_state_dict does; the fixture must be able to see it."""
    old = old_state("autoencoder.pth")
    network = autoencoder_from_old(old, {**architecture()["autoencoder"], "include_fc": True})
    with torch.no_grad():
        network.encoder.blocks[4].attn.out_proj.weight.copy_(old["encoder.blocks.4.proj_attn.weight"])
        network.encoder.blocks[4].attn.out_proj.bias.copy_(old["encoder.blocks.4.proj_attn.bias"])
    with pytest.raises(AssertionError):
        assert_autoencoder_reproduces(network)


def test_text_conditioned_unet_reproduces_the_old_outputs():
    network = unet_from_old(old_state("diffusion_model.pth"), architecture()["unet"])
    assert_unet_reproduces(network, "unet")
    assert "include_fc" not in network.architecture.args  # cross-attention projections were applied: kept


def test_unet_with_old_self_attention_reproduces_the_old_outputs():
    network = unet_from_old(old_state("diffusion_model_self_attention.pth"), architecture()["self_attention_unet"])
    assert_unet_reproduces(network, "self_attention_unet")


@pytest.mark.parametrize(
    "missing",
    [
        "encoder.blocks.3.conv1.conv.weight",  # same name in both formats
        "encoder.blocks.4.to_q.weight",  # renamed by MONAI's mapping
        "decoder.blocks.5.proj_attn.bias",  # a dead projection: still part of a genuine old file
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
    ],
)
def test_a_missing_key_is_named(missing):
    kind = "diffusion_model.pth" if missing.startswith("down_blocks") else "autoencoder.pth"
    old = old_state(kind)
    del old[missing]
    convert, args = (unet_from_old, "unet") if kind == "diffusion_model.pth" else (autoencoder_from_old, "autoencoder")
    with pytest.raises(ConversionError, match="lacks") as err:
        convert(old, architecture()[args])
    assert repr(missing) in str(err.value)


def test_an_unused_old_key_is_named():
    old = old_state("autoencoder.pth")
    old["encoder.blocks.99.extra.weight"] = torch.ones(3)
    with pytest.raises(ConversionError, match=r"does not use: 'encoder\.blocks\.99\.extra\.weight'"):
        autoencoder_from_old(old, architecture()["autoencoder"])


def test_another_architecture_names_the_first_mismatching_key_and_shapes():
    args = {**architecture()["autoencoder"], "num_channels": [8, 8, 8]}
    expected = r"first mismatching key 'encoder\.blocks\.6\.conv1\.conv\.weight' has shape \(16, 8, 3, 3\) in the old"
    with pytest.raises(ConversionError, match=expected + r" weights and \(8, 8, 3, 3\) in the architecture"):
        autoencoder_from_old(old_state("autoencoder.pth"), args)


def test_converted_weights_are_refused_as_already_converted():
    network = autoencoder_from_old(old_state("autoencoder.pth"), architecture()["autoencoder"])
    with pytest.raises(ConversionError, match="already a MONAI-core state dict"):
        autoencoder_from_old(network.state_dict(), architecture()["autoencoder"])
    ours = {"autoencoder": network.state_dict(), "architectures": {}}
    with pytest.raises(ConversionError, match="already converted"):
        autoencoder_from_old(ours, architecture()["autoencoder"])


def test_the_old_state_dict_is_not_changed():
    old = old_state("autoencoder.pth")
    keys = list(old)
    autoencoder_from_old(old, architecture()["autoencoder"])
    assert list(old) == keys


def test_old_argument_names_are_translated():
    old = {"_target_": "generative.networks.nets.AutoencoderKL", "num_channels": [4], "use_checkpointing": True}
    assert core_args(old) == {"channels": [4], "use_checkpoint": True}
    assert core_args(CXR_UNET_ARGS) == CXR_UNET_ARGS


def test_the_full_size_zoo_architecture_is_one_latent_diffusion_model():
    """Built on the meta device: the shapes without the memory."""
    with torch.device("meta"):
        autoencoder = build_network("AutoencoderKL", **CXR_AUTOENCODER_ARGS)
        unet = build_network("DiffusionModelUNet", **CXR_UNET_ARGS)
    image = torch.empty(1, 1, 512, 512, device="meta")
    latent = autoencoder.encode_stage_2_inputs(image)
    assert tuple(latent.shape) == (1, 3, 64, 64)
    context = torch.empty(1, 77, 1024, device="meta")
    timesteps = torch.zeros(1, dtype=torch.long, device="meta")
    assert unet(latent, timesteps=timesteps, context=context).shape == latent.shape
    assert CXR_SCHEDULER["prediction_type"] == "v_prediction"
