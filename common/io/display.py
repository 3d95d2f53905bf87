"""How image arrays are turned for display in PNG figures and TensorBoard: a parameter, not a modality default."""

from __future__ import annotations

import numpy as np
import torch

#: ``"array"``: rows and columns as stored. ``"ras_axial"``: an axial slice stored (x, y) in RAS+ order
#: (NIfTI / MNI convention) shown with anterior up: transpose, then flip the rows. ``"xy"``: a 2D image stored
#: (x, y), as MONAI's PIL reader loads PNG and JPEG files (and its PIL writer saves them): transpose only.
DISPLAY_ORIENTATIONS = ("array", "ras_axial", "xy")


def check_orientation(orientation: str) -> str:
    if orientation not in DISPLAY_ORIENTATIONS:
        raise ValueError(f"Unknown display orientation {orientation!r}: use one of {', '.join(DISPLAY_ORIENTATIONS)}.")
    return orientation


def to_display(image: np.ndarray | torch.Tensor, orientation: str) -> np.ndarray | torch.Tensor:
    """``image`` ``(..., H, W)`` turned for display (same type; a tensor stays a tensor)."""
    if check_orientation(orientation) == "array":
        return image
    if orientation == "xy":
        return image.transpose(-1, -2) if isinstance(image, torch.Tensor) else np.swapaxes(image, -1, -2)
    if isinstance(image, torch.Tensor):
        return image.transpose(-1, -2).flip(-2)
    return np.flip(np.swapaxes(image, -1, -2), -2)
