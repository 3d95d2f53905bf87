"""Mixed precision: whether a run uses AMP, said out loud when the device cannot."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def resolve_amp(amp: bool, device: torch.device | str) -> bool:
    """``amp`` if the device supports MONAI's AMP (CUDA); otherwise ``False`` with a warning, never silently.

    Raises:
        ValueError: ``amp`` is not a boolean (``--amp true`` reaches the config as the string ``"true"``).
    """
    if not isinstance(amp, bool):
        raise ValueError(f"`amp` must be True or False, got {amp!r} (write --amp True or --amp False).")
    device = torch.device(device)
    if amp and device.type != "cuda":
        logger.warning("AMP (mixed precision) was asked for, but the device is %s: running in float32.", device)
        return False
    return amp
