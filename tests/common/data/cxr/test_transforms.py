"""common.data.cxr.transforms: radiograph files -> (1, W, H) float32 in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.cxr.transforms import LoadRadiographd


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_8_and_16_bit_files_load_in_monai_layout_scaled_to_unit_range(tmp_path):
    rows, cols = 6, 4
    eight = (np.arange(rows * cols).reshape(rows, cols) * 10).astype(np.uint8)
    image = LoadRadiographd()({"image": _png(tmp_path / "a.png", eight)})["image"]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.shape == (1, cols, rows)  # MONAI's PIL reader: first axis across the image
    np.testing.assert_allclose(image[0].numpy(), eight.T / 255.0, atol=1e-6)

    sixteen = (np.arange(rows * cols).reshape(rows, cols) * 2000).astype(np.uint16)
    image = LoadRadiographd(max_value=65535)({"image": _png(tmp_path / "b.png", sixteen)})["image"]
    np.testing.assert_allclose(image[0].numpy(), sixteen.T / 65535.0, atol=1e-6)


def test_missing_keys_only_when_allowed(tmp_path):
    item = {"z_mu": torch.zeros(3, 2, 2)}
    assert LoadRadiographd(allow_missing_keys=True)(item).keys() == {"z_mu"}
    with pytest.raises(RuntimeError, match="LoadImaged"):
        LoadRadiographd()(item)


def test_bad_max_value_is_refused():
    with pytest.raises(ValueError, match="max_value"):
        LoadRadiographd(max_value=0)
