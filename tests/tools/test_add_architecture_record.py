"""add-architecture-record: upgrading a weight file exported before architecture records existed."""

from __future__ import annotations

import json

import pytest
import torch

from common.io.weights import load_weights
from common.networks.architecture import load_network
from tools.add_architecture_record import add_architecture_record

CONFIG = {
    "channels": [8, 8],
    "autoencoder_def": {
        "_target_": "AutoencoderKL",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": "@channels",
        "latent_channels": 3,
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "attention_levels": [False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    },
}


def test_record_is_added_checked_and_weights_untouched(tmp_path):
    from monai.bundle import ConfigParser

    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    net = ConfigParser(CONFIG).get_parsed_content("autoencoder_def")
    path = tmp_path / "autoencoder.pt"
    torch.save({"autoencoder": net.state_dict(), "other": {"x": 1}}, path)
    add_architecture_record(str(path), "autoencoder", str(config), "autoencoder_def")
    state = load_weights(path)
    assert state["other"] == {"x": 1}
    assert state["architectures"]["autoencoder"]["args"]["channels"] == [8, 8]
    torch.testing.assert_close(load_network(path, "autoencoder").state_dict(), net.state_dict())


def test_a_config_that_does_not_describe_the_weights_is_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CONFIG, "channels": [8, 16]}))
    from monai.bundle import ConfigParser

    path = tmp_path / "autoencoder.pt"
    torch.save({"autoencoder": ConfigParser(CONFIG).get_parsed_content("autoencoder_def").state_dict()}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="size mismatch"):
        add_architecture_record(str(path), "autoencoder", str(config), "autoencoder_def")
    assert path.read_bytes() == before
