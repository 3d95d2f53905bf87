"""Numerical precision of network calls: MONAI's CUDA AMP switch, and bf16 autocast on any device that has it."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from monai.inferers import Inferer

logger = logging.getLogger(__name__)

#: Precisions of the network calls: ``fp32`` as is, ``bf16`` under bfloat16 autocast.
PRECISIONS = ("fp32", "bf16")
#: What a config's ``precision`` may say: a precision, or ``auto`` (:func:`resolve_precision`).
PRECISION_CHOICES = ("auto", *PRECISIONS)
#: CPU flags of native bf16 arithmetic (without them oneDNN emulates bf16, slower than fp32).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``ValueError`` naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    return precision


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA device that supports it, or a CPU with
    :data:`NATIVE_BF16_CPU_FLAGS`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision``, with ``auto`` made ``bf16`` where ``device`` has native bf16 (:func:`native_bf16`), else
    ``fp32``; ``ValueError`` naming the choices for anything else. Configs record the resolved value."""
    if precision == "auto":
        resolved = "bf16" if native_bf16(device) else "fp32"
        logger.info("precision auto: %s on %s", resolved, torch.device(device))
        return resolved
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISION_CHOICES)}.")
    return precision


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context that runs network calls in ``precision`` on ``device`` (``bf16``: bfloat16 autocast).

    bf16 keeps float32's exponent range, so training needs no gradient scaler; a CPU without native bf16 runs it
    emulated (slower, not wrong).
    """
    if check_precision(precision) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


class AutocastInferer(Inferer):
    """Runs another inferer under :func:`autocast` and hands its output back in float32.

    MONAI's trainers autocast only on CUDA (``amp``); wrapping ``train#inferer`` gives bf16 forward passes on a
    CPU too, while the loss is computed in float32 and backward follows the forward's dtypes. With ``fp32`` the
    wrapped inferer runs unchanged.

    Args:
        inferer: the inferer whose network calls are autocast (e.g. ``DiffusionInferer``).
        precision: ``"fp32"`` or ``"bf16"``.
    """

    def __init__(self, inferer: Inferer, precision: str = "fp32") -> None:
        super().__init__()
        self.inferer = inferer
        self.precision = check_precision(precision)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if self.precision == "fp32":
            return self.inferer(inputs, network, *args, **kwargs)
        with autocast(self.precision, inputs.device):
            output = self.inferer(inputs, network, *args, **kwargs)
        return output.float() if isinstance(output, torch.Tensor) else output
