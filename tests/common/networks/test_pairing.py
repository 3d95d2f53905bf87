"""common.networks.pairing: a diffusion model is refused with an autoencoder or text encoder it was not trained with."""

from __future__ import annotations

import pytest
import torch

from common.networks.pairing import DependencyRecord, check_dependencies, fingerprint
from tests.conftest import make_autoencoder, make_text_model


def _perturbed(network: torch.nn.Module, prefix: str) -> torch.nn.Module:
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.startswith(prefix):
                param.add_(0.01)
                break
    return network


def test_matching_networks_pass_and_weights_come_back():
    ae, text = make_autoencoder(), make_text_model()
    weights = {"unet": {}, "depends_on": DependencyRecord(autoencoder=ae, text_encoder=text).state_dict()}
    assert (
        check_dependencies(weights, "d.pt", autoencoder=make_autoencoder(), text_encoder=make_text_model()) is weights
    )


def test_a_fine_tuned_decoder_keeps_the_pairing():
    """Decoder-only fine-tuning leaves the latent space, so the diffusion model stays valid."""
    weights = {"depends_on": DependencyRecord(autoencoder=make_autoencoder()).state_dict()}
    check_dependencies(weights, "d.pt", autoencoder=_perturbed(make_autoencoder(), "decoder."))


@pytest.mark.parametrize("name", ["autoencoder", "text_encoder"])
def test_another_network_is_refused_with_the_fix(name):
    ae, text = make_autoencoder(), make_text_model()
    weights = {"depends_on": DependencyRecord(autoencoder=ae, text_encoder=text).state_dict()}
    given = {"autoencoder": make_autoencoder(), "text_encoder": make_text_model()}
    given[name] = _perturbed(given[name], "encoder.")
    with pytest.raises(ValueError, match=rf"d\.pt was trained with another {name}.*use them from FOLDER"):
        check_dependencies(weights, "d.pt", how_to_fix="use them from FOLDER", **given)
    assert fingerprint(name, given[name]) != weights["depends_on"][name]


def test_files_without_a_record_load_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        check_dependencies({"unet": {}}, "old.pt", autoencoder=make_autoencoder())
    assert "cannot be checked" in caplog.text
