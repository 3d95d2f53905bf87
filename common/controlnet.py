"""ControlNet on a frozen latent diffusion UNet: initialisation, training forward pass and guided sampling."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from monai.inferers import ControlNetDiffusionInferer, Inferer
from monai.networks.utils import copy_model_state

from common.checkpoints import load_weights
from common.engines import LatentDiffusionPrepareBatch
from common.latent import ScaledLatentSpace, SchedulerSettings
from common.sampling import GuidedLatentSampler

logger = logging.getLogger(__name__)


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


def unet_fingerprint(unet_state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and values of a UNet state dict.

    It identifies the base model a ControlNet was trained against, independent of how the file was saved.
    """
    digest = hashlib.sha256()
    for name in sorted(unet_state):
        tensor = unet_state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BaseModelRecord:
    """Exported beside the ControlNet weights (``"base_model"`` entry): the fingerprint of the UNet it steers."""

    def __init__(self, unet_state: Mapping[str, torch.Tensor]) -> None:
        self.unet_sha256 = unet_fingerprint(unet_state)

    def state_dict(self) -> dict[str, str]:
        return {"unet_sha256": self.unet_sha256}


def load_controlnet(
    controlnet: torch.nn.Module, path: str, unet_state: Mapping[str, torch.Tensor], how_to_get: str = ""
) -> torch.nn.Module:
    """Load exported ControlNet weights, refusing them if they were trained against another base UNet.

    ControlNet residuals only make sense for the UNet they were trained with; a different ``brain_t1_ldm`` model
    would translate into plausible-looking nonsense. Files without a ``"base_model"`` record are loaded with a
    warning.

    Raises:
        ValueError: the recorded base UNet fingerprint differs from ``unet_state``'s, or the file has no
            ``"controlnet"`` entry.
    """
    state = read_controlnet_weights(path, how_to_get)
    recorded = state.get("base_model", {}).get("unet_sha256")
    if recorded is None:
        logger.warning("%s does not record which base UNet it was trained with; it cannot be checked.", path)
    elif recorded != (actual := unet_fingerprint(unet_state)):
        raise ValueError(
            f"{path} was trained against another base UNet (fingerprint {recorded[:12]}, this base model's is "
            f"{actual[:12]}). Use the brain_t1_ldm weights it was trained with (see this bundle's docs/README.md), "
            f"or fine-tune it on this base: train_controlnet.json --controlnet_init_path {path}."
        )
    controlnet.load_state_dict(state["controlnet"])
    return controlnet


def freeze(network: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients of ``network`` and put it in eval mode; return it (for config expressions)."""
    network.requires_grad_(False)
    return network.eval()


class ControlNetTrainingInferer(Inferer):
    """Training forward pass: noise the latents, run the ControlNet, add its residuals to the frozen UNet.

    The ControlNet is the engine's ``network`` (the trained one); the frozen UNet is held here. The
    computation is MONAI's ``ControlNetDiffusionInferer``, which is called with the networks in the
    order it expects.

    Called as ``inferer(latents, controlnet, noise=, timesteps=, condition=, controlnet_cond=)`` with
    latents ``(B, c, h, w)``, text context ``(B, 77, D)`` and the condition image ``(B, 1, H, W)``;
    returns the UNet's prediction ``(B, c, h, w)``.
    """

    def __init__(self, scheduler: torch.nn.Module, diffusion_model: torch.nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.inferer = ControlNetDiffusionInferer(scheduler)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        controlnet_cond: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.inferer(
            inputs, self.diffusion_model, network, noise, timesteps, cn_cond=controlnet_cond, condition=condition
        )


class ControlNetPrepareBatch(LatentDiffusionPrepareBatch):
    """Like ``LatentDiffusionPrepareBatch``, plus the condition image ``batch[condition_key]`` ``(B, 1, H, W)``.

    Returns ``(latents, target, (), {"noise", "timesteps", "condition", "controlnet_cond"})`` for
    :class:`ControlNetTrainingInferer`.
    """

    def __init__(self, *args: Any, condition_key: str = "flair", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.condition_key = condition_key

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        latents, target, args, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        cond = batchdata[self.condition_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return latents, target, args, {**extra, "controlnet_cond": cond}


class ControlNetGuidedSampler(GuidedLatentSampler):
    """Guided latent sampling where a ControlNet steers the frozen UNet at every step.

    The engine's ``network`` is the ControlNet; ``controlnet_cond`` ``(B, 1, H, W)`` is the condition
    image at full resolution (the ControlNet's conditioning embedding downsamples it to latent size).
    Both guidance branches see the same condition. ``conditioning_scale`` multiplies the residuals
    (0 ignores the condition, 1 is what training used).
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        settings: SchedulerSettings,
        diffusion_model: torch.nn.Module,
        conditioning_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(latent_space, settings, **kwargs)
        if conditioning_scale < 0:
            raise ValueError(f"`conditioning_scale` must be >= 0 (1 is what training used), got {conditioning_scale}.")
        self.diffusion_model = diffusion_model
        self.conditioning_scale = float(conditioning_scale)

    def predict(  # type: ignore[override]
        self,
        network: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        controlnet_cond: torch.Tensor,
    ) -> torch.Tensor:
        down, mid = network(
            x=latents,
            timesteps=timesteps,
            controlnet_cond=controlnet_cond,
            conditioning_scale=self.conditioning_scale,
            context=context,
        )
        return self.diffusion_model(
            latents,
            timesteps=timesteps,
            context=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )
