"""Freezing networks or parts of them (frozen bases, decoder-only fine-tuning)."""

from __future__ import annotations

import torch


def freeze(network: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients of ``network`` and put it in eval mode; return it (for config expressions)."""
    network.requires_grad_(False)
    return network.eval()


def freeze_encoder(autoencoder: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients of an ``AutoencoderKL``'s encoder side (encoder, ``quant_conv_mu``/``_log_sigma``).

    Fine-tuning only the decoder keeps the latent space, so diffusion models and ControlNets trained on
    it stay valid. Returns the autoencoder.
    """
    for name in ("encoder", "quant_conv_mu", "quant_conv_log_sigma"):
        getattr(autoencoder, name).requires_grad_(False)
    return autoencoder
