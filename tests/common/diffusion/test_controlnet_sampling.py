"""common.controlnet, common.condition_images and common.translation_evaluation on tiny networks and files."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ControlNet

from common.diffusion.sampling import ControlNetGuidedSampler
from common.diffusion.schedules import SchedulerSettings
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


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *LATENT, generator=g),
        torch.randn(batch, 77, CONTEXT_DIM, generator=g),
        torch.rand(batch, 1, *IMAGE_SIZE, generator=g),
    )


def test_guided_sampler_uses_condition_and_scale(latent_space):
    unet = freeze(make_unet())
    controlnet = controlnet_from_unet(make_controlnet(), unet.state_dict())
    with torch.no_grad():  # a trained ControlNet: non-zero output convolutions
        for name, p in controlnet.named_parameters():
            if "zero" in name or name.startswith("controlnet_"):
                p.normal_(0, 0.2)
    latents, context, cond = _inputs()
    uncond = torch.zeros_like(context)

    def sample(scale, guidance, condition):
        sampler = ControlNetGuidedSampler(
            latent_space,
            SchedulerSettings(num_train_timesteps=100),
            diffusion_model=unet,
            conditioning_scale=scale,
            num_inference_steps=3,
            guidance_scale=guidance,
            progress=False,
        )
        return sampler(latents, controlnet, context=context, uncond_context=uncond, controlnet_cond=condition)

    a = sample(1.0, 3.0, cond)
    assert a.shape == (2, 1, *IMAGE_SIZE)
    assert torch.equal(a, sample(1.0, 3.0, cond)), "deterministic with DDIM"
    assert not torch.allclose(a, sample(1.0, 3.0, cond.flip(0))), "the condition steers the output"
    # conditioning_scale 0 removes the ControlNet: the output no longer depends on the condition.
    assert torch.allclose(sample(0.0, 1.0, cond), sample(0.0, 1.0, cond.flip(0)))
    with pytest.raises(ValueError, match="conditioning_scale"):
        ControlNetGuidedSampler(latent_space, SchedulerSettings(), diffusion_model=unet, conditioning_scale=-1)
