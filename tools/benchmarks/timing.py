"""Interleaved repetition, medians and ratios, peak memory and a description of the machine.

Speed claims in this project are ratios against a baseline run in the same process, interleaved
(``A B C A B C ...``), so that a slow phase of a shared CPU hits every candidate alike. Each candidate's
repetition times are summarised by their median; the ratio to the baseline is given twice: the ratio
of the medians, and the median of the per-round (paired) ratios, which is the more robust one when the
machine's speed drifts.

Peak memory: the kernel's per-process high-water mark of resident memory (``VmHWM`` in
``/proc/self/status``), reset before each timed call by writing ``5`` to ``/proc/self/clear_refs`` (Linux
4.0+), after giving freed heap back to the system with glibc's ``malloc_trim``. That attributes a peak to
one candidate even though all run in one process. ``resource.getrusage(...).ru_maxrss`` is the same
high-water mark but cannot be reset, so after the first candidate its deltas are zero; ``tracemalloc``
sees only Python's allocator, not the buffers of torch tensors. Where the reset is refused (not Linux,
or no permission) the report falls back to ``ru_maxrss`` and says so in ``memory_method``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Memory figures are reported in MiB.
MIB = 1024 * 1024

#: How :class:`PeakRSS` measured, as written into reports.
HWM_RESET = "VmHWM of /proc/self/status, reset per call through /proc/self/clear_refs"
RU_MAXRSS = "resource.getrusage ru_maxrss (process-wide high-water mark, cannot be reset: deltas after the first call are lower bounds)"


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (also for child processes through ``OMP_NUM_THREADS``); returns the count in use.

    ``torch.set_num_threads`` sets the OpenMP pool size at run time, which is what ``OMP_NUM_THREADS`` does at start-up.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive integer, got {threads!r}.")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleaved_order(names: Sequence[str], repeats: int) -> list[str]:
    """``repeats`` rounds of ``names`` in the given order: ``[A, B, C, A, B, C, ...]``."""
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"Candidate names must be distinct and not empty, got {list(names)}.")
    return [name for _ in range(repeats) for name in names]


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None`` where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_kib() -> int:
    # Linux reports kilobytes, macOS bytes.
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


def _release_free_heap() -> None:
    """Hand freed heap back to the system (glibc only), so the baseline of the next measurement is what is in use."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


class PeakRSS:
    """Context manager: peak resident memory of the process during the block (MiB), and its rise over the start.

    After the block: ``peak_mib`` (the high-water mark), ``increase_mib`` (``peak - resident at start``, what the
    block itself needed beyond what was already held) and ``method`` (:data:`HWM_RESET` or :data:`RU_MAXRSS`).
    """

    def __enter__(self) -> PeakRSS:
        _release_free_heap()
        self.method = HWM_RESET if _reset_high_water_mark() else RU_MAXRSS
        self._start_kib = _proc_status_kib("VmRSS") if self.method == HWM_RESET else _ru_maxrss_kib()
        return self

    def __exit__(self, *exc: object) -> None:
        peak_kib = _proc_status_kib("VmHWM") if self.method == HWM_RESET else _ru_maxrss_kib()
        self.peak_mib = peak_kib * 1024 / MIB
        self.increase_mib = max(peak_kib - (self._start_kib or 0), 0) * 1024 / MIB


@dataclass(frozen=True)
class Trial:
    """One timed call of one candidate: which round, seconds, peak resident memory (MiB) and its rise."""

    name: str
    round: int
    seconds: float
    peak_rss_mib: float
    rss_increase_mib: float
    memory_method: str


def run_interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Trial]:
    """Call every candidate ``repeats`` times in :func:`interleaved_order`, timing each call with ``clock``.

    Memory is measured around the timed region (resetting the high-water mark costs a few milliseconds
    and is not timed). Warm-up is the caller's: call each candidate once before.
    """
    names = list(candidates)
    trials = []
    for i, name in enumerate(interleaved_order(names, repeats)):
        with PeakRSS() as memory:
            start = clock()
            candidates[name]()
            seconds = clock() - start
        trials.append(Trial(name, i // len(names), seconds, memory.peak_mib, memory.increase_mib, memory.method))
    return trials


def ratio(value: float, baseline: float) -> float:
    """``value / baseline`` (a time ratio: below 1 is faster than the baseline)."""
    if baseline <= 0:
        raise ValueError(f"The baseline time must be positive, got {baseline}.")
    return value / baseline


def summarize(trials: Sequence[Trial], items_per_call: int, baseline: str) -> dict[str, dict[str, Any]]:
    """Per candidate: per-item median/min/max seconds, ratios to ``baseline``, peak memory.

    ``items_per_call`` is the number of images (or training images) one call handles; times are divided by it.
    ``time_ratio`` is the ratio of the medians; ``paired_ratio`` the median over rounds of
    ``candidate / baseline`` in the same round.
    """
    by_name: dict[str, list[Trial]] = {}
    for trial in trials:
        by_name.setdefault(trial.name, []).append(trial)
    if baseline not in by_name:
        raise ValueError(f"Baseline {baseline!r} is not among the candidates {sorted(by_name)}.")
    base_by_round = {t.round: t.seconds for t in by_name[baseline]}
    base_median = statistics.median(base_by_round.values())
    summary = {}
    for name, own in by_name.items():
        seconds = [t.seconds for t in own]
        median = statistics.median(seconds)
        summary[name] = {
            "seconds_per_call": seconds,
            "seconds_per_item": {
                "median": median / items_per_call,
                "min": min(seconds) / items_per_call,
                "max": max(seconds) / items_per_call,
            },
            "time_ratio": ratio(median, base_median),
            "paired_ratio": statistics.median(ratio(t.seconds, base_by_round[t.round]) for t in own),
            "peak_rss_mib": max(t.peak_rss_mib for t in own),
            "rss_increase_mib": max(t.rss_increase_mib for t in own),
        }
    return summary


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    from common.engines.precision import cpu_flags

    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
            break
    return model, cpu_flags()


def machine_info() -> dict[str, Any]:
    """What the numbers came from: CPU, native bf16, thread counts, library versions."""
    import monai

    from common.engines.precision import NATIVE_BF16_CPU_FLAGS

    model, flags = _cpuinfo()
    bf16_flags = sorted(flags & NATIVE_BF16_CPU_FLAGS)
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_cpu_flags": bf16_flags,
        # oneDNN runs bf16 kernels on any AVX512 CPU; only avx512_bf16 / amx_bf16 make them faster than fp32.
        "onednn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "native_bf16": bool(bf16_flags),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def now() -> str:
    """The current local date and time, ISO 8601 with offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
