"""common.engines.prepare_batch: batch dicts -> autoencoder, latent diffusion and sampling inputs."""

from __future__ import annotations

import pytest
import torch
from monai.data import list_data_collate
from monai.inferers import DiffusionInferer

from common.diffusion.requests import SeededNoised, sample_requests
from common.diffusion.sampling import GuidedLatentSampler
from common.diffusion.schedules import SchedulerSettings
from common.engines.prepare_batch import (
    AutoencoderPrepareBatch,
    LatentDiffusionPrepareBatch,
    PromptSamplingPrepareBatch,
)
from tests.conftest import CONTEXT_DIM, IMAGE_SIZE, LATENT


def _training_batch(images):
    return {"image": images, "caption": ["T1-weighted image of a brain.", ""]}


def _request_batch(prompt="T1-weighted image of a brain.", num_samples=2, seed=11):
    noised = SeededNoised(LATENT)
    return list_data_collate([noised(r) for r in sample_requests(prompt, num_samples, seed)])


def test_latent_diffusion_batch_v_prediction(latent_space, prompt_encoder, images, monkeypatch):
    scheduler = SchedulerSettings(prediction_type="v_prediction").build("ddpm")
    prepare = LatentDiffusionPrepareBatch(latent_space, prompt_encoder, scheduler)
    fixed_noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(prepare, "get_noise", lambda latents: fixed_noise.clone())

    torch.manual_seed(0)
    latents, target, args, kwargs = prepare(_training_batch(images), device="cpu")
    torch.manual_seed(0)  # latents are posterior samples of the autoencoder
    expected_latents = latent_space.encode(images)

    assert latents.shape == (2, *LATENT)
    torch.testing.assert_close(latents, expected_latents)
    assert args == ()
    assert set(kwargs) == {"noise", "timesteps", "condition"}
    torch.testing.assert_close(kwargs["noise"], fixed_noise)
    timesteps = kwargs["timesteps"]
    assert timesteps.shape == (2,) and timesteps.dtype == torch.long
    assert 0 <= timesteps.min() and timesteps.max() < scheduler.num_train_timesteps
    torch.testing.assert_close(target, scheduler.get_velocity(latents, fixed_noise, timesteps))
    assert kwargs["condition"].shape == (2, 77, CONTEXT_DIM)
    torch.testing.assert_close(kwargs["condition"], prompt_encoder(["T1-weighted image of a brain.", ""]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_latent_diffusion_batch_other_targets(latent_space, prompt_encoder, images, prediction_type):
    scheduler = SchedulerSettings(prediction_type=prediction_type).build("ddpm")
    latents, target, _, kwargs = LatentDiffusionPrepareBatch(latent_space, prompt_encoder, scheduler)(
        _training_batch(images)
    )
    torch.testing.assert_close(target, kwargs["noise"] if prediction_type == "epsilon" else latents)


def test_latent_diffusion_batch_feeds_diffusion_inferer(latent_space, prompt_encoder, unet, images):
    """The returned (inputs, target, args, kwargs) is what ``SupervisedTrainer`` hands to ``DiffusionInferer``."""
    scheduler = SchedulerSettings(num_train_timesteps=100).build("ddpm")
    prepare = LatentDiffusionPrepareBatch(latent_space, prompt_encoder, scheduler, image_key="img", prompt_key="txt")
    assert prepare.num_train_timesteps == 100
    latents, target, args, kwargs = prepare({"img": images, "txt": ("a", "b")}, device="cpu")
    assert kwargs["timesteps"].max() < 100
    prediction = DiffusionInferer(scheduler)(latents, unet, *args, **kwargs)
    assert prediction.shape == target.shape
    assert torch.isfinite(torch.nn.functional.mse_loss(prediction, target))


def test_prompt_sampling_batch(prompt_encoder):
    batch = _request_batch()
    noise, target, args, kwargs = PromptSamplingPrepareBatch(prompt_encoder)(batch, device="cpu")
    assert noise.shape == (2, *LATENT)
    torch.testing.assert_close(noise, batch["noise"])
    assert target is None and args == ()
    assert set(kwargs) == {"context", "uncond_context", "generator"}
    assert kwargs["context"].shape == (2, 77, CONTEXT_DIM)
    torch.testing.assert_close(kwargs["context"], prompt_encoder(["T1-weighted image of a brain."] * 2))
    torch.testing.assert_close(kwargs["uncond_context"], prompt_encoder(["", ""]))
    assert not torch.allclose(kwargs["context"], kwargs["uncond_context"])
    # one generator seeded from the batch, or one per sample (seeds 11, 12)
    generators = kwargs["generator"] if isinstance(kwargs["generator"], list | tuple) else [kwargs["generator"]]
    assert all(isinstance(g, torch.Generator) for g in generators)
    assert generators[0].initial_seed() == 11


def test_prompt_sampling_batch_custom_empty_prompt(prompt_encoder):
    _, _, _, kwargs = PromptSamplingPrepareBatch(prompt_encoder, empty_prompt="brain")(_request_batch())
    torch.testing.assert_close(kwargs["uncond_context"], prompt_encoder(["brain", "brain"]))


def test_prompt_sampling_batch_drives_the_sampler(latent_space, prompt_encoder, unet):
    sampler = GuidedLatentSampler(latent_space, SchedulerSettings(), "ddim", 2, 3.0, eta=1.0, progress=False)
    prepare = PromptSamplingPrepareBatch(prompt_encoder)

    def generate():
        noise, _, args, kwargs = prepare(_request_batch(num_samples=2, seed=4))
        return sampler(noise, unet, *args, **kwargs)

    a, b = generate(), generate()
    assert a.shape == (2, 1, *IMAGE_SIZE)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed, same images, also with fresh noise per step


def test_autoencoder_prepare_batch(images):
    x, y = AutoencoderPrepareBatch(image_key="img")({"img": images}, device="cpu")
    assert x is y
    torch.testing.assert_close(x, images)


def test_ddim_image_depends_only_on_prompt_and_seed_not_on_batch(latent_space, prompt_encoder, unet):
    """``seed=5 num_samples=2`` and ``seed=6 num_samples=1`` write the same ``..._seed6`` image (DDIM, eta 0)."""
    sampler = GuidedLatentSampler(latent_space, SchedulerSettings(), "ddim", 2, 3.0, progress=False)
    prepare = PromptSamplingPrepareBatch(prompt_encoder)
    noise, _, args, kwargs = prepare(_request_batch(num_samples=2, seed=5))
    in_batch = sampler(noise, unet, *args, **kwargs)[1]
    noise, _, args, kwargs = prepare(_request_batch(num_samples=1, seed=6))
    alone = sampler(noise, unet, *args, **kwargs)[0]
    torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-4)


def test_stochastic_image_depends_only_on_prompt_and_seed_not_on_batch(latent_space, prompt_encoder, unet):
    sampler = GuidedLatentSampler(latent_space, SchedulerSettings(), "ddim", 2, 3.0, eta=1.0, progress=False)
    prepare = PromptSamplingPrepareBatch(prompt_encoder)
    noise, _, args, kwargs = prepare(_request_batch(num_samples=2, seed=5))
    in_batch = sampler(noise, unet, *args, **kwargs)[1]
    noise, _, args, kwargs = prepare(_request_batch(num_samples=1, seed=6))
    alone = sampler(noise, unet, *args, **kwargs)[0]
    torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-4)


def test_a_batch_of_cached_moments_gives_what_encoding_gives(latent_space, prompt_encoder, images):
    """Cached-latent training is exact: same noise, same latents, target and context as encoding each step."""
    scheduler = SchedulerSettings().build("ddpm")
    prepare = LatentDiffusionPrepareBatch(latent_space, prompt_encoder, scheduler)
    mu, sigma = latent_space.moments(images)
    cached = {"z_mu": mu, "z_sigma": sigma, "caption": _training_batch(images)["caption"]}
    torch.manual_seed(5)
    expected = prepare(_training_batch(images))
    torch.manual_seed(5)
    got = prepare(cached)
    for a, b in zip(
        (got[0], got[1], got[3]["noise"], got[3]["timesteps"]),
        (expected[0], expected[1], expected[3]["noise"], expected[3]["timesteps"]),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    latent_space.scale_factor = None
    assert latent_space.fit_scale_factor([cached], "image", "cpu") > 0  # fitted from the moments, no image needed
