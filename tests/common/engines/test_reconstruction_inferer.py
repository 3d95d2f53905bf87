"""common.engines: prepare_batch callables, the AutoencoderKL adversarial trainer and the reconstruction inferer."""

from __future__ import annotations

import torch

from common.engines.inferers import ReconstructionInferer


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
