"""common.engines.losses: patch adversarial losses on the discriminator's last output."""

from __future__ import annotations

import pytest
import torch

from common.engines.losses import DiscriminatorAdversarialLoss, GeneratorAdversarialLoss


def test_adversarial_losses_use_the_last_discriminator_output():
    real, fake = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    intermediate = torch.full((2, 4, 6, 6), 5.0)
    g_loss, d_loss = GeneratorAdversarialLoss(), DiscriminatorAdversarialLoss()
    # least squares: a generator whose fakes are judged real (logit 1) has no loss.
    assert g_loss([intermediate, real]).item() == pytest.approx(0.0)
    assert g_loss(fake).item() > 0
    assert d_loss([intermediate, real], [intermediate, fake]).item() == pytest.approx(0.0)
    assert d_loss(fake, real).item() > 0
