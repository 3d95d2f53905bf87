"""common.networks.controlnet and freezing: initialisation from the UNet, base-model fingerprint."""

from __future__ import annotations

import pytest
import torch

from common.io.weights import state_fingerprint
from common.networks.controlnet import (
    BaseModelRecord,
    controlnet_from_unet,
    load_controlnet,
    read_controlnet_weights,
)
from common.networks.freezing import freeze
from tests.conftest import CONTEXT_DIM, IMAGE_SIZE, LATENT, make_controlnet, make_unet


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *LATENT, generator=g),
        torch.randn(batch, 77, CONTEXT_DIM, generator=g),
        torch.rand(batch, 1, *IMAGE_SIZE, generator=g),
    )


def test_controlnet_from_unet_copies_encoder_and_starts_as_identity():
    unet = make_unet()
    controlnet = controlnet_from_unet(make_controlnet(), unet.state_dict())
    for name, value in controlnet.state_dict().items():
        if name.startswith(("conv_in.", "down_blocks.", "middle_block.")):
            assert torch.equal(value, unet.state_dict()[name]), name
    latents, context, cond = _inputs()
    t = torch.tensor([10, 500])
    down, mid = controlnet(latents, t, controlnet_cond=cond, context=context)
    # Zero convolutions: a fresh ControlNet adds nothing, so the pair predicts exactly what the UNet does.
    with_control = unet(
        latents, t, context=context, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )
    assert torch.allclose(with_control, unet(latents, t, context=context))


def test_controlnet_from_unet_rejects_mismatched_architecture():
    with pytest.raises(ValueError, match="does not match the base UNet"):
        controlnet_from_unet(make_controlnet(channels=(16, 16)), make_unet().state_dict())


def test_state_fingerprint_tracks_values_not_storage():
    state = make_unet().state_dict()
    copy = {k: v.clone() for k, v in reversed(list(state.items()))}
    assert state_fingerprint(copy) == state_fingerprint(state)
    name = next(iter(copy))
    copy[name] = copy[name] + 1e-6
    assert state_fingerprint(copy) != state_fingerprint(state)


def test_load_controlnet_refuses_weights_of_another_base(tmp_path, caplog):
    unet_state = make_unet().state_dict()
    trained = controlnet_from_unet(make_controlnet(), unet_state)
    path = tmp_path / "controlnet.pt"
    torch.save({"controlnet": trained.state_dict(), "base_model": BaseModelRecord(unet_state).state_dict()}, path)

    loaded = load_controlnet(make_controlnet(), read_controlnet_weights(str(path)), unet_state, str(path))
    torch.testing.assert_close(loaded.state_dict(), trained.state_dict())

    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in unet_state.items()}
    with pytest.raises(ValueError, match="trained against another base UNet.*--controlnet_init_path"):
        load_controlnet(make_controlnet(), read_controlnet_weights(str(path)), other, str(path))

    foreign = tmp_path / "diffusion_model.pt"
    torch.save({"unet": unet_state}, foreign)
    with pytest.raises(ValueError, match="has no 'controlnet' entry"):
        read_controlnet_weights(str(foreign))

    torch.save({"controlnet": trained.state_dict()}, path)  # older export without the record
    with caplog.at_level("WARNING"):
        load_controlnet(make_controlnet(), read_controlnet_weights(str(path)), other, str(path))
    assert "does not record which base UNet" in caplog.text


def test_freeze_turns_off_gradients():
    unet = freeze(make_unet().train())
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
