"""Make the old-format weight fixture of ``tests/fixtures/zoo_cxr`` with the real ``monai-generative`` package.

The MONAI Model Zoo's ``cxr_image_synthesis_latent_diffusion_model`` ships state dicts of
``generative.networks.nets.AutoencoderKL`` and ``DiffusionModelUNet`` (``monai-generative`` 0.2.3). This script
builds tiny networks of those classes, gives every parameter a random value (norms, biases and the zero-initialised
output convolutions too, so that any wrong key mapping changes the outputs), saves their state dicts as the zoo files
are saved (``torch.save(network.state_dict(), path)``), runs them on fixed inputs, and saves inputs, outputs and the
architecture arguments beside them. ``tests/common/networks/test_zoo_import.py`` checks that the converted MONAI-core
networks reproduce those outputs.

It does not import ``common`` (the old package does not import beside MONAI 1.6): run it with the python of a separate
environment, made once as the fixture's README.md says::

    .venv-generative/bin/python tools/make_zoo_weights_fixture.py --output_dir tests/fixtures/zoo_cxr
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

SEED = 20240601

#: 2D 32x32 one-channel images; three levels, attention in the two deeper ones and in the non-local blocks.
AUTOENCODER_ARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_channels": [8, 8, 16],
    "latent_channels": 3,
    "num_res_blocks": 1,
    "norm_num_groups": 4,
    "norm_eps": 1e-6,
    "attention_levels": [False, True, True],
    "with_encoder_nonlocal_attn": True,
    "with_decoder_nonlocal_attn": True,
}

#: Text-conditioned like the zoo UNet: cross-attention (spatial transformers) in the two deeper levels, one with two
#: heads, one with one.
UNET_ARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 3,
    "num_channels": [8, 8, 16],
    "num_res_blocks": 1,
    "attention_levels": [False, True, True],
    "norm_num_groups": 4,
    "norm_eps": 1e-6,
    "resblock_updown": False,
    "num_head_channels": [0, 4, 16],
    "with_conditioning": True,
    "transformer_num_layers": 1,
    "cross_attention_dim": 12,
}

#: Unconditioned UNet: its attention levels use the old self-attention block (the one with ``proj_attn``).
SELF_ATTENTION_UNET_ARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 3,
    "num_channels": [4, 8],
    "num_res_blocks": 1,
    "attention_levels": [False, True],
    "norm_num_groups": 4,
    "norm_eps": 1e-6,
    "num_head_channels": [0, 4],
    "with_conditioning": False,
}

IMAGE_SHAPE = (2, 1, 32, 32)  # batch, channel, height, width
LATENT_SHAPE = (2, 3, 16, 16)
CONTEXT_SHAPE = (2, 5, 12)  # batch, tokens, cross_attention_dim
TIMESTEPS = [17, 731]


@torch.no_grad()
def randomise(network: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a random value of a sensible size.

    Weights (``ndim > 1``) get ``N(0, 1 / fan_in)``; norm scales ``1 + N(0, 0.3^2)``; biases ``N(0, 0.3^2)``. Nothing
    stays zero or one, so a parameter loaded into the wrong place, or left at its initial value, shows in the outputs.
    """
    for name, parameter in network.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if parameter.ndim > 1:
            fan_in = math.prod(parameter.shape[1:])
            parameter.copy_(noise / math.sqrt(fan_in))
        elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
            parameter.copy_(1.0 + 0.3 * noise)
        else:
            parameter.copy_(0.3 * noise)


def make_autoencoder_case(generator: torch.Generator) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An old ``AutoencoderKL`` with random weights and its outputs on a fixed image batch.

    Returns the network and ``{"image": (2, 1, 32, 32), "z_mu", "z_sigma": (2, 3, 8, 8), "reconstruction": (2, 1, 32,
    32)}``; the reconstruction decodes ``z_mu`` (the deterministic path of ``reconstruct``).
    """
    from generative.networks.nets import AutoencoderKL

    network = AutoencoderKL(**AUTOENCODER_ARGS).eval()
    randomise(network, generator)
    image = torch.rand(IMAGE_SHAPE, generator=generator)
    z_mu, z_sigma = network.encode(image)
    return network, {
        "image": image,
        "z_mu": z_mu,
        "z_sigma": z_sigma,
        "reconstruction": network.reconstruct(image),
    }


def make_unet_case(
    args: dict[str, Any], generator: torch.Generator, conditioned: bool
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An old ``DiffusionModelUNet`` with random weights and its prediction on fixed inputs.

    Returns the network and ``{"x": (2, 3, 16, 16), "timesteps": (2,) long, "context": (2, 5, 12) (conditioned only),
    "prediction": (2, 3, 16, 16)}``.
    """
    from generative.networks.nets import DiffusionModelUNet

    network = DiffusionModelUNet(**args).eval()
    randomise(network, generator)
    case = {"x": torch.randn(LATENT_SHAPE, generator=generator), "timesteps": torch.tensor(TIMESTEPS)}
    if conditioned:
        case["context"] = torch.randn(CONTEXT_SHAPE, generator=generator)
    case["prediction"] = network(case["x"], timesteps=case["timesteps"], context=case.get("context"))
    return network, case


def package_versions() -> dict[str, str]:
    """Versions of the packages that made the fixture."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "monai", "monai-generative", "numpy")}


@torch.no_grad()
def make_fixture(output_dir: Path) -> None:
    """Write ``autoencoder.pth``, ``diffusion_model.pth``, ``diffusion_model_self_attention.pth`` (old state dicts),
    ``outputs.pt`` (inputs and outputs of each) and ``architecture.json`` (old-style arguments, versions) to
    ``output_dir``."""
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(SEED)
    autoencoder, autoencoder_case = make_autoencoder_case(generator)
    unet, unet_case = make_unet_case(UNET_ARGS, generator, conditioned=True)
    self_attention_unet, self_attention_case = make_unet_case(SELF_ATTENTION_UNET_ARGS, generator, conditioned=False)

    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(autoencoder.state_dict(), output_dir / "autoencoder.pth")
    torch.save(unet.state_dict(), output_dir / "diffusion_model.pth")
    torch.save(self_attention_unet.state_dict(), output_dir / "diffusion_model_self_attention.pth")
    torch.save(
        {"autoencoder": autoencoder_case, "unet": unet_case, "self_attention_unet": self_attention_case},
        output_dir / "outputs.pt",
    )
    record = {
        "autoencoder": AUTOENCODER_ARGS,
        "unet": UNET_ARGS,
        "self_attention_unet": SELF_ATTENTION_UNET_ARGS,
        "seed": SEED,
        "made_with": package_versions(),
    }
    (output_dir / "architecture.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in sorted(output_dir.iterdir()):
        print(f"{path}: {path.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("tests/fixtures/zoo_cxr"))
    make_fixture(parser.parse_args().output_dir)


if __name__ == "__main__":
    main()
