"""common.engines.precision: AMP is used where the device has it, and a request it cannot honour is said."""

from __future__ import annotations

import pytest
import torch

from common.engines.precision import resolve_amp


def test_amp_on_a_cpu_is_refused_out_loud(caplog):
    with caplog.at_level("WARNING"):
        assert resolve_amp(True, torch.device("cpu")) is False
    assert "running in float32" in caplog.text
    assert resolve_amp(False, "cpu") is False


def test_amp_kept_on_cuda_devices():
    assert resolve_amp(True, "cuda:0") is True  # only the device type is read: no GPU needed


def test_amp_must_be_a_boolean():
    with pytest.raises(ValueError, match="--amp True"):
        resolve_amp("true", "cpu")
