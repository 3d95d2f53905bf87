"""common.engines.precision: AMP where the device has it (a request it cannot honour is said), bf16 autocast anywhere."""

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


class _Recorder(torch.nn.Module):
    """A linear layer that records the dtype its output was computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.dtypes.append(y.dtype)
        return y


def test_autocast_inferer_runs_the_network_in_bf16_and_hands_back_float32():
    from monai.inferers import SimpleInferer

    from common.engines.precision import AutocastInferer

    torch.manual_seed(0)
    net, x = _Recorder(), torch.randn(4, 8)
    reference = SimpleInferer()(x, net)
    fp32 = AutocastInferer(SimpleInferer(), "fp32")(x, net)
    assert torch.equal(fp32, reference), "fp32 leaves the wrapped inferer untouched"
    out = AutocastInferer(SimpleInferer(), "bf16")(x, net)
    assert net.dtypes == [torch.float32, torch.float32, torch.bfloat16]
    assert out.dtype == torch.float32 and torch.allclose(out, reference, atol=0.05)
    assert 0 < (out - reference).abs().max() < 0.05, "bf16 rounding, not an identical float32 result"

    # training through it: float32 loss, gradients reach float32 parameters
    loss = torch.nn.functional.mse_loss(AutocastInferer(SimpleInferer(), "bf16")(x, net), torch.zeros(4, 8))
    loss.backward()
    assert loss.dtype == torch.float32 and net.linear.weight.grad.dtype == torch.float32
    assert net.linear.weight.grad.abs().sum() > 0


def test_unknown_precision_is_refused_with_the_choices():
    from monai.inferers import SimpleInferer

    from common.engines.precision import AutocastInferer, autocast

    with pytest.raises(ValueError, match="Unknown precision 'fp16': use one of fp32, bf16"):
        AutocastInferer(SimpleInferer(), "fp16")
    with pytest.raises(ValueError, match="Unknown precision"):
        autocast("half", "cpu")


def test_auto_precision_is_bf16_only_where_the_device_has_native_bf16(monkeypatch, tmp_path):
    from common.engines import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert precision.cpu_flags(cpuinfo) >= {"avx512f", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == set()

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f"})  # oneDNN would emulate bf16: slower
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("auto", "mps") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve_precision("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.resolve_precision("auto", "cuda:0") == "fp32"
    # explicit choices are kept whatever the device; anything else names the choices
    assert (
        precision.resolve_precision("bf16", "cpu") == "bf16" and precision.resolve_precision("fp32", "cuda") == "fp32"
    )
    with pytest.raises(ValueError, match="use one of auto, fp32, bf16"):
        precision.resolve_precision("half", "cpu")
