"""The exponential moving average of a network's weights that training validates and exports."""

from __future__ import annotations

import torch
from ignite.handlers import EMAHandler


def weight_average(network: torch.nn.Module, decay: float) -> EMAHandler:
    """Ignite's ``EMAHandler`` for ``network``, averaging with ``decay`` per step (0.999: about 1000 steps).

    The decay is reached linearly over the first ``1 / (1 - decay)`` steps, starting from no averaging, so that a
    short run does not average in its starting (random or pretrained) weights. Attach the handler to the trainer
    after resuming, and read the average from ``.ema_model``; a ``DistributedDataParallel`` network is averaged
    through its module.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"weight average: decay must lie strictly between 0 and 1, got {decay}.")
    return EMAHandler(network, momentum=1.0 - decay, momentum_warmup=1.0, warmup_iters=round(1.0 / (1.0 - decay)))
