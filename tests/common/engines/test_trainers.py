"""common.engines.trainers: the AutoencoderKL recipe (KL, perceptual, adversarial warm-up)."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import PatchDiscriminator

from common.engines.losses import DiscriminatorAdversarialLoss, GeneratorAdversarialLoss
from common.engines.prepare_batch import (
    AutoencoderPrepareBatch,
)
from common.engines.trainers import AutoencoderKLTrainer
from tests.conftest import make_autoencoder


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


class _ConstantPerceptual(torch.nn.Module):
    def forward(self, recon, image):
        return recon.sum() * 0 + 2.0


def test_kl_divergence():
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert AutoencoderKLTrainer.kl_divergence(mu, sigma).item() == pytest.approx(0.0, abs=1e-6)
    mu, sigma = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), 2.0)
    per_value = 0.5 * (0.25 + 4.0 - math.log(4.0) - 1)
    assert AutoencoderKLTrainer.kl_divergence(mu, sigma).item() == pytest.approx(48 * per_value, rel=1e-5)


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
