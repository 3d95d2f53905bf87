"""Transforms of chest radiograph files."""

from __future__ import annotations

import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, LoadImaged, ScaleIntensityRanged


class LoadRadiographd(Compose):
    """Load grayscale radiographs (8-bit PNG or JPEG by default) as float32 images ``(1, W, H)`` in [0, 1].

    The layout is MONAI's PIL reader's: the first spatial axis runs across the image (the patient's right first),
    the second down it. Every chest X-ray config, the finding classifier and the latent cache read images this way,
    so the networks see one layout.

    Args:
        keys: keys of the file paths.
        max_value: the file value that maps to 1.0 (255 for 8-bit files, 65535 for 16-bit ones).
        allow_missing_keys: skip absent keys (training items whose latents are cached have no image).
    """

    def __init__(self, keys: KeysCollection = "image", max_value: float = 255.0, allow_missing_keys: bool = False):
        if not max_value > 0:
            raise ValueError(f"max_value must be > 0, got {max_value}.")
        super().__init__(
            [
                LoadImaged(keys, ensure_channel_first=True, image_only=True, allow_missing_keys=allow_missing_keys),
                ScaleIntensityRanged(
                    keys, 0.0, float(max_value), 0.0, 1.0, clip=True, allow_missing_keys=allow_missing_keys
                ),
                EnsureTyped(keys, dtype=torch.float32, track_meta=False, allow_missing_keys=allow_missing_keys),
            ]
        )
