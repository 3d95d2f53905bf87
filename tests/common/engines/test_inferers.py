"""common.controlnet, common.condition_images and common.translation_evaluation on tiny networks and files."""

from __future__ import annotations

import torch
from monai.networks.nets import ControlNet

from common.diffusion.schedules import SchedulerSettings
from common.engines.inferers import ControlNetTrainingInferer
from common.engines.prepare_batch import ControlNetPrepareBatch
from common.networks.controlnet import controlnet_from_unet
from common.networks.freezing import freeze
from tests.conftest import CONTEXT_DIM, IMAGE_SIZE, LATENT_CHANNELS, make_unet

LATENT = (LATENT_CHANNELS, IMAGE_SIZE[0] // 2, IMAGE_SIZE[1] // 2)


def make_controlnet(channels=(8, 8), embedding=(4, 8)) -> ControlNet:
    """ControlNet matching ``make_unet`` (its embedding downsamples x2, like the tiny autoencoder)."""
    torch.manual_seed(1)
    return ControlNet(
        spatial_dims=2,
        in_channels=LATENT_CHANNELS,
        channels=channels,
        num_res_blocks=1,
        attention_levels=(False, True),
        num_head_channels=(0, 8),
        with_conditioning=True,
        cross_attention_dim=CONTEXT_DIM,
        norm_num_groups=8,
        conditioning_embedding_in_channels=1,
        conditioning_embedding_num_channels=embedding,
    )


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
