"""Shared fixtures: tiny MONAI networks and a tiny CLIP prompt encoder (CPU, a few ms per call)."""

from __future__ import annotations

import functools
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.helpers import REPO_ROOT

# One intra-op thread: the tiny networks gain nothing from more, and on a busy machine the thread pool's
# spin-waiting makes each forward pass 50x slower.
torch.set_num_threads(1)

TOKENIZER_DIR = REPO_ROOT / "bundles" / "brain_t1_ldm" / "models" / "tokenizer"

IMAGE_SIZE = (16, 16)  # tiny images; the autoencoder below downsamples x2
LATENT_CHANNELS = 3
CONTEXT_DIM = 32  # hidden size of the tiny text tower = UNet cross-attention dim


def make_autoencoder(channels: tuple[int, ...] = (8, 8), seed: int = 0):
    """Attention-free ``AutoencoderKL`` (norm groups must divide every channel count)."""
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=channels,
        latent_channels=LATENT_CHANNELS,
        num_res_blocks=1,
        norm_num_groups=8,
        attention_levels=(False,) * len(channels),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def make_unet(seed: int = 0):
    """Text-conditioned ``DiffusionModelUNet`` on the latents of :func:`make_autoencoder`."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(seed)
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        channels=(8, 8),
        num_res_blocks=1,
        attention_levels=(False, True),
        num_head_channels=(0, 8),
        with_conditioning=True,
        cross_attention_dim=CONTEXT_DIM,
        norm_num_groups=8,
    )
    # MONAI zero-initialises the output convolutions (a fresh UNet predicts 0 whatever its inputs): give
    # those weights random values so that outputs depend on latents, timesteps and context.
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return unet.eval()


LATENT = (LATENT_CHANNELS, IMAGE_SIZE[0] // 2, IMAGE_SIZE[1] // 2)  # latent shape of make_autoencoder's images


def make_controlnet(channels=(8, 8), embedding=(4, 8)):
    """ControlNet matching :func:`make_unet` (its embedding downsamples x2, like the tiny autoencoder)."""
    from monai.networks.nets import ControlNet

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


def make_text_model(seed: int = 0):
    from common.networks.text_encoder import build_clip_text_model

    torch.manual_seed(seed)
    return build_clip_text_model(hidden_size=CONTEXT_DIM, num_hidden_layers=1, num_attention_heads=2)


@functools.cache
def _cached_tokenizer(path: str):
    from common.networks.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(path)


def make_prompt_encoder(hidden_layer: int = -1, seed: int = 0, text_model=None, **kwargs):
    """``CLIPPromptEncoder`` on the shipped tokenizer (loaded once per session: it takes ~1 s)."""
    from common.networks.text_encoder import CLIPPromptEncoder

    text_model = make_text_model(seed) if text_model is None else text_model
    with mock.patch("common.networks.text_encoder.load_clip_tokenizer", _cached_tokenizer):
        return CLIPPromptEncoder(str(TOKENIZER_DIR), text_model, hidden_layer=hidden_layer, **kwargs)


def make_tiny_net(seed: int = 0) -> torch.nn.Module:
    """A two-layer MLP (4 -> 3 -> 2): the smallest network with a state dict worth saving."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


@pytest.fixture
def weights_file(tmp_path) -> Path:
    """A plain state dict of ``make_tiny_net(1)`` saved with ``torch.save``."""
    path = tmp_path / "model.pt"
    torch.save(make_tiny_net(1).state_dict(), path)
    return path


@pytest.fixture
def tokenizer_dir() -> Path:
    return TOKENIZER_DIR


@pytest.fixture
def autoencoder():
    return make_autoencoder()


@pytest.fixture
def latent_space(autoencoder):
    from common.diffusion.latent_space import ScaledLatentSpace

    return ScaledLatentSpace(autoencoder, scale_factor=0.5)


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def text_model():
    return make_text_model()


@pytest.fixture
def prompt_encoder():
    """A fresh encoder per test (its prompt cache is state)."""
    return make_prompt_encoder()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand((2, 1, *IMAGE_SIZE), generator=torch.Generator().manual_seed(0))


class CallRecorder(torch.nn.Module):
    """Wraps a network and records the batch size and context of each call."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.batch_sizes: list[int] = []
        self.contexts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        self.contexts.append(context)
        return self.network(x, timesteps=timesteps, context=context)
