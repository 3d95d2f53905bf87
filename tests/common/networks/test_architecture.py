"""common.networks.architecture: weight files say which network they fit, and only known networks can be named."""

from __future__ import annotations

import pytest
import torch

from common.engines.handlers import WeightsExporter
from common.io.weights import load_weights
from common.networks.architecture import (
    NetworkArchitecture,
    architecture_of,
    build_network,
    load_network,
    read_architecture,
)
from common.networks.controlnet import controlnet_for_unet, controlnet_from_unet

AE_ARGS = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": (8, 8),
    "latent_channels": 3,
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "attention_levels": (False, False),
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
UNET_ARGS = {
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
}


def test_built_network_remembers_its_architecture():
    net = build_network("AutoencoderKL", **AE_ARGS)
    arch = architecture_of(net)
    assert arch.network == "AutoencoderKL" and arch.args["channels"] == [8, 8]  # plain values, lists not tuples
    assert architecture_of(torch.nn.Linear(2, 2)) is None


def test_exported_weights_rebuild_the_same_network(tmp_path):
    net = build_network("AutoencoderKL", **AE_ARGS)
    path = tmp_path / "autoencoder.pt"
    WeightsExporter(str(path), {"autoencoder": net}, provenance={"demo": True})()
    state = load_weights(path)
    assert state["architectures"]["autoencoder"]["network"] == "AutoencoderKL"
    assert state["provenance"] == {"demo": True}
    loaded = load_network(path, "autoencoder")
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(loaded.eval()(x)[1], net.eval()(x)[1])
    assert architecture_of(loaded) == architecture_of(net)


def test_weights_without_a_record_name_the_fix(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"autoencoder": build_network("AutoencoderKL", **AE_ARGS).state_dict()}, path)
    with pytest.raises(ValueError, match="add-architecture-record"):
        load_network(path, "autoencoder")


def test_a_record_cannot_name_arbitrary_code(tmp_path):
    with pytest.raises(ValueError, match="Unknown network 'os.system'"):
        NetworkArchitecture.from_dict({"network": "os.system", "args": {}})
    path = tmp_path / "evil.pt"
    torch.save({"net": {}, "architectures": {"net": {"network": "builtins.eval", "args": {}}}}, path)
    with pytest.raises(ValueError, match="Unknown network"):
        load_network(path, "net")


def test_weights_that_do_not_fit_their_record_are_refused(tmp_path):
    path = tmp_path / "bad.pt"
    other = build_network("AutoencoderKL", **{**AE_ARGS, "channels": (8, 16), "norm_num_groups": 8})
    record = NetworkArchitecture("AutoencoderKL", AE_ARGS).to_dict()
    torch.save({"autoencoder": other.state_dict(), "architectures": {"autoencoder": record}}, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_network(path, "autoencoder")


def test_controlnet_mirrors_the_base_unet_read_from_its_weights():
    unet = build_network("DiffusionModelUNet", **UNET_ARGS)
    weights = {"unet": unet.state_dict(), "architectures": {"unet": architecture_of(unet).to_dict()}}
    controlnet = controlnet_for_unet(read_architecture(weights, "unet"), conditioning_channels=[4, 8])
    arch = architecture_of(controlnet)
    assert arch.network == "ControlNet" and arch.args["cross_attention_dim"] == 16
    assert arch.args["conditioning_embedding_num_channels"] == [4, 8] and "out_channels" not in arch.args
    controlnet_from_unet(controlnet, unet.state_dict())  # every encoder weight fits
    with pytest.raises(ValueError, match="steers a DiffusionModelUNet"):
        controlnet_for_unet(NetworkArchitecture("AutoencoderKL", AE_ARGS), [4, 8])
