"""common.engines: prepare_batch callables, the AutoencoderKL adversarial trainer and the reconstruction inferer."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.data import list_data_collate
from monai.inferers import DiffusionInferer
from monai.networks.nets import PatchDiscriminator

from common.engines import (
    AutoencoderKLTrainer,
    AutoencoderPrepareBatch,
    DiscriminatorAdversarialLoss,
    GeneratorAdversarialLoss,
    LatentDiffusionPrepareBatch,
    PromptSamplingPrepareBatch,
    ReconstructionInferer,
)
from common.latent import SchedulerSettings
from common.sampling import GuidedLatentSampler, SeededNoised, sample_requests
from tests.conftest import CONTEXT_DIM, IMAGE_SIZE, LATENT_CHANNELS, make_autoencoder

LATENT = (LATENT_CHANNELS, IMAGE_SIZE[0] // 2, IMAGE_SIZE[1] // 2)


def _training_batch(images):
    return {"image": images, "caption": ["T1-weighted image of a brain.", ""]}


# LatentDiffusionPrepareBatch -------------------------------------------------------------------------


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


# PromptSamplingPrepareBatch --------------------------------------------------------------------------


def _request_batch(prompt="T1-weighted image of a brain.", num_samples=2, seed=11):
    noised = SeededNoised(LATENT)
    return list_data_collate([noised(r) for r in sample_requests(prompt, num_samples, seed)])


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


# Losses ----------------------------------------------------------------------------------------------


def test_kl_divergence():
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert AutoencoderKLTrainer.kl_divergence(mu, sigma).item() == pytest.approx(0.0, abs=1e-6)
    mu, sigma = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), 2.0)
    per_value = 0.5 * (0.25 + 4.0 - math.log(4.0) - 1)
    assert AutoencoderKLTrainer.kl_divergence(mu, sigma).item() == pytest.approx(48 * per_value, rel=1e-5)


def test_adversarial_losses_use_the_last_discriminator_output():
    real, fake = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    intermediate = torch.full((2, 4, 6, 6), 5.0)
    g_loss, d_loss = GeneratorAdversarialLoss(), DiscriminatorAdversarialLoss()
    # least squares: a generator whose fakes are judged real (logit 1) has no loss.
    assert g_loss([intermediate, real]).item() == pytest.approx(0.0)
    assert g_loss(fake).item() > 0
    assert d_loss([intermediate, real], [intermediate, fake]).item() == pytest.approx(0.0)
    assert d_loss(fake, real).item() > 0


# AutoencoderKLTrainer --------------------------------------------------------------------------------


def _trainer(max_epochs, data, perceptual_loss=None, adversarial_start_epoch=2, lr=1e-3):
    autoencoder = make_autoencoder()
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(spatial_dims=2, num_layers_d=1, channels=8, in_channels=1, out_channels=1)
    return AutoencoderKLTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=data,
        g_network=autoencoder,
        g_optimizer=torch.optim.Adam(autoencoder.parameters(), lr=lr),
        g_loss_function=GeneratorAdversarialLoss(),
        recon_loss_function=torch.nn.L1Loss(),
        d_network=discriminator,
        d_optimizer=torch.optim.Adam(discriminator.parameters(), lr=lr),
        d_loss_function=DiscriminatorAdversarialLoss(),
        prepare_batch=AutoencoderPrepareBatch(),
        perceptual_loss=perceptual_loss,
        adversarial_start_epoch=adversarial_start_epoch,
        decollate=False,
    )


LOSS_KEYS = ("loss", "reconstruction_loss", "kl_loss", "perceptual_loss", "generator_loss", "discriminator_loss")


def test_autoencoder_trainer_adversarial_warm_up(images):
    data = [{"image": images}, {"image": images.flip(-1)}]  # a list of dict batches, as a DataLoader yields
    trainer = _trainer(max_epochs=2, data=data)
    initial_d = {k: v.clone() for k, v in trainer.state.d_network.state_dict().items()}
    initial_g = {k: v.clone() for k, v in trainer.state.g_network.state_dict().items()}
    records, d_after_epoch_1 = [], {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        # the keys the bundle's logging handler reads, as plain strings
        records.append((engine.state.epoch, {k: float(engine.state.output[k]) for k in LOSS_KEYS}))
        assert engine.state.output["pred"].shape == images.shape

    @trainer.on(Events.EPOCH_COMPLETED(once=1))
    def snapshot(engine):
        d_after_epoch_1.update({k: v.clone() for k, v in engine.state.d_network.state_dict().items()})

    trainer.run()

    assert [epoch for epoch, _ in records] == [1, 1, 2, 2]
    for epoch, losses in records:
        assert all(math.isfinite(v) for v in losses.values())
        assert losses["perceptual_loss"] == 0.0  # no perceptual network given
        if epoch == 1:  # warm-up: no adversarial term, discriminator untouched
            assert losses["discriminator_loss"] == 0.0 and losses["generator_loss"] == 0.0
            assert losses["loss"] == pytest.approx(losses["reconstruction_loss"] + 1e-8 * losses["kl_loss"], rel=1e-6)
        else:
            assert losses["discriminator_loss"] > 0.0 and losses["generator_loss"] > 0.0
            assert losses["loss"] > losses["reconstruction_loss"]
    for key, value in initial_d.items():
        torch.testing.assert_close(d_after_epoch_1[key], value, rtol=0, atol=0)
    assert any(not torch.equal(trainer.state.d_network.state_dict()[k], v) for k, v in initial_d.items())
    assert any(not torch.equal(trainer.state.g_network.state_dict()[k], v) for k, v in initial_g.items())
    # Reconstruction improves over the 4 steps on a repeated pair of batches.
    assert records[-1][1]["reconstruction_loss"] < records[0][1]["reconstruction_loss"]


class _ConstantPerceptual(torch.nn.Module):
    def forward(self, recon, image):
        return recon.sum() * 0 + 2.0


def test_autoencoder_trainer_adds_weighted_perceptual_loss(images):
    trainer = _trainer(max_epochs=1, data=[{"image": images}], perceptual_loss=_ConstantPerceptual())
    trainer.run()
    out = trainer.state.output
    assert float(out["perceptual_loss"]) == pytest.approx(2.0)
    expected = float(out["reconstruction_loss"]) + 1e-8 * float(out["kl_loss"]) + 0.002 * 2.0
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-6)


def test_autoencoder_trainer_without_data_raises():
    trainer = _trainer(max_epochs=1, data=[None])
    with pytest.raises(ValueError, match="batch data"):
        trainer.run()


def test_autoencoder_prepare_batch(images):
    x, y = AutoencoderPrepareBatch(image_key="img")({"img": images}, device="cpu")
    assert x is y
    torch.testing.assert_close(x, images)


# ReconstructionInferer -------------------------------------------------------------------------------


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
