"""common.engines.inferers: the ControlNet training forward pass and the reconstruction inferer."""

from __future__ import annotations

import torch

from common.diffusion.schedules import SchedulerSettings
from common.engines.inferers import ControlNetTrainingInferer, ReconstructionInferer
from common.engines.prepare_batch import ControlNetPrepareBatch
from common.networks.controlnet import controlnet_from_unet
from common.networks.freezing import freeze
from tests.conftest import IMAGE_SIZE, make_controlnet, make_unet


def test_training_inferer_trains_only_the_controlnet(latent_space, prompt_encoder):
    unet = freeze(make_unet())
    controlnet = controlnet_from_unet(make_controlnet(), unet.state_dict())
    settings = SchedulerSettings(num_train_timesteps=100)
    scheduler = settings.build("ddpm")
    prepare = ControlNetPrepareBatch(latent_space, prompt_encoder, scheduler, condition_key="flair")
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(2, 1, *IMAGE_SIZE, generator=g),
        "flair": torch.rand(2, 1, *IMAGE_SIZE, generator=g),
        "caption": ["a", "b"],
    }
    latents, target, args, kwargs = prepare(batch)
    assert set(kwargs) == {"noise", "timesteps", "condition", "controlnet_cond"}
    assert torch.equal(kwargs["controlnet_cond"], batch["flair"])
    pred = ControlNetTrainingInferer(scheduler, unet)(latents, controlnet, *args, **kwargs)
    assert pred.shape == target.shape
    torch.nn.functional.mse_loss(pred, target).backward()
    zero_conv_grads = [p.grad for n, p in controlnet.named_parameters() if "zero" in n or "controlnet_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in zero_conv_grads)
    assert all(p.grad is None for p in unet.parameters())


def test_reconstruction_inferer_returns_only_the_reconstruction(autoencoder, images):
    autoencoder.eval()
    with torch.no_grad():
        torch.manual_seed(0)  # AutoencoderKL.forward samples z from the posterior
        recon = ReconstructionInferer()(images, autoencoder)
        torch.manual_seed(0)
        expected, _, _ = autoencoder(images)
    assert isinstance(recon, torch.Tensor)
    assert recon.shape == images.shape
    torch.testing.assert_close(recon, expected)
