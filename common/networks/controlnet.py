"""ControlNet on a frozen diffusion UNet: initialisation from the UNet, export record, checked loading."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.utils import copy_model_state

from common.io.weights import load_weights, state_fingerprint
from common.networks.architecture import NetworkArchitecture

logger = logging.getLogger(__name__)


def controlnet_for_unet(
    unet_architecture: NetworkArchitecture,
    conditioning_channels: Sequence[int],
    conditioning_in_channels: int = 1,
) -> torch.nn.Module:
    """A fresh ControlNet whose encoder mirrors the UNet of ``unet_architecture`` (read from the base's weights).

    The ControlNet copies the base UNet's channels, attention, heads, res blocks and cross-attention size, so a
    bundle built on a base model declares only what is its own: the conditioning embedding
    (``conditioning_channels``, one per downsampling of the condition image, and its input channels).
    """
    if unet_architecture.network != "DiffusionModelUNet":
        raise ValueError(f"A ControlNet steers a DiffusionModelUNet, not a {unet_architecture.network}.")
    args = {k: v for k, v in unet_architecture.args.items() if k not in ("out_channels", "dropout_cattn")}
    args["conditioning_embedding_in_channels"] = int(conditioning_in_channels)
    args["conditioning_embedding_num_channels"] = list(conditioning_channels)
    return NetworkArchitecture("ControlNet", args).build()


def controlnet_from_unet(controlnet: torch.nn.Module, unet_state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Copy the matching encoder weights of a trained UNet into ``controlnet`` (zero convolutions stay zero).

    This is ``load_state_dict(unet_state, strict=False)`` with a check: a ControlNet whose
    architecture does not match the UNet (channels, attention levels, heads) would silently start from
    scratch, so an initialisation that copies no encoder weight is an error.
    """
    _, updated, _ = copy_model_state(controlnet, dict(unet_state), inplace=True)
    encoder = [k for k in controlnet.state_dict() if k.startswith(("conv_in.", "down_blocks.", "middle_block."))]
    if not set(encoder) <= set(updated):
        missing = sorted(set(encoder) - set(updated))
        raise ValueError(
            f"The ControlNet does not match the base UNet: {len(missing)} encoder weights could not be copied "
            f"(e.g. {missing[:3]}). Give the ControlNet the base UNet's channels, attention levels, heads and "
            "res blocks."
        )
    logger.info("ControlNet initialised from the base UNet (%d tensors copied).", len(updated))
    return controlnet


def read_controlnet_weights(path: str, how_to_get: str = "") -> dict[str, Any]:
    """An exported ControlNet file (``{"controlnet": state_dict, "base_model": {...}}``), via ``load_weights``.

    Raises:
        ValueError: the file has no ``"controlnet"`` entry (it is some other checkpoint).
    """
    state = load_weights(path, how_to_get=how_to_get)
    if "controlnet" not in state:
        raise ValueError(f"{path} has no 'controlnet' entry; it holds {sorted(state)}.")
    return state


def init_controlnet(
    controlnet: torch.nn.Module, unet_state: Mapping[str, torch.Tensor], init_path: str | None = None
) -> torch.nn.Module:
    """Start a ControlNet from trained ControlNet weights at ``init_path`` (fine-tuning) or, if ``None``, from the UNet.

    ``init_path`` is a file with a ``"controlnet"`` entry, such as the bundle's ``models/controlnet.pt``.
    """
    if init_path:
        state = read_controlnet_weights(init_path, "Give --controlnet_init_path an exported controlnet.pt.")
        controlnet.load_state_dict(state["controlnet"])
        logger.info("ControlNet initialised from %s.", init_path)
        return controlnet
    return controlnet_from_unet(controlnet, unet_state)


class BaseModelRecord:
    """Exported beside the ControlNet weights (``"base_model"`` entry): the fingerprint of the UNet it steers."""

    def __init__(self, unet_state: Mapping[str, torch.Tensor]) -> None:
        self.unet_sha256 = state_fingerprint(unet_state)

    def state_dict(self) -> dict[str, str]:
        return {"unet_sha256": self.unet_sha256}


def load_controlnet(
    controlnet: torch.nn.Module,
    weights: Mapping[str, Any],
    unet_state: Mapping[str, torch.Tensor],
    path: str = "the ControlNet weights",
) -> torch.nn.Module:
    """Load exported ControlNet ``weights`` (from :func:`read_controlnet_weights`), refusing another base's.

    ControlNet residuals only make sense for the UNet they were trained with; a different base model would
    translate into plausible-looking nonsense. Files without a ``"base_model"`` record are loaded with a
    warning. ``path`` names the file in messages.

    Raises:
        ValueError: the recorded base UNet fingerprint differs from ``unet_state``'s.
    """
    recorded = weights.get("base_model", {}).get("unet_sha256")
    if recorded is None:
        logger.warning("%s does not record which base UNet it was trained with; it cannot be checked.", path)
    elif recorded != (actual := state_fingerprint(unet_state)):
        raise ValueError(
            f"{path} was trained against another base UNet (fingerprint {recorded[:12]}, this base model's is "
            f"{actual[:12]}). Use the base model weights it was trained with (see the bundle's docs/README.md), "
            f"or fine-tune it on this base: train_controlnet.json --controlnet_init_path {path}."
        )
    controlnet.load_state_dict(weights["controlnet"])
    return controlnet
