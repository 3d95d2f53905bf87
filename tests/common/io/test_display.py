"""common.io.display: how stored arrays are turned for figures and TensorBoard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.io.display import to_display


def test_xy_layout_is_transposed_for_display_for_arrays_and_tensors():
    stored = np.arange(6).reshape(2, 3)  # (x, y): 2 columns, 3 rows on screen
    np.testing.assert_array_equal(to_display(stored, "xy"), stored.T)
    np.testing.assert_array_equal(to_display(torch.as_tensor(stored)[None], "xy").numpy()[0], stored.T)


def test_ras_axial_turns_anterior_up_and_array_is_unchanged():
    stored = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(to_display(stored, "ras_axial"), stored.T[::-1])
    assert to_display(stored, "array") is stored


def test_unknown_orientation_names_the_choices():
    with pytest.raises(ValueError, match="array, ras_axial, xy"):
        to_display(np.zeros((2, 2)), "lps")
