"""CPU threads of a run: a knob, because the best count depends on the machine and what else runs on it."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def set_num_threads(num_threads: int | None) -> int:
    """Use ``num_threads`` intra-op CPU threads (``None``: leave PyTorch's choice, one per core); return the count.

    On a small machine shared with other work, one thread can beat two by a wide margin (each thread waits for the
    slowest); on a free workstation more threads are faster. ``docs/benchmarks.md`` has the measurement.
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"`num_threads` must be a positive integer or None, got {num_threads!r}.")
        torch.set_num_threads(num_threads)
    count = torch.get_num_threads()
    logger.info("CPU threads: %d%s", count, "" if num_threads is not None else " (PyTorch's default)")
    return count
