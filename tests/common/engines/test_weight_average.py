"""The weight average that training validates and exports: ignite's EMA with a warm-up from no averaging."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from common.engines.weight_average import weight_average


def _train(network: torch.nn.Module, steps: int, decay: float) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    handler = weight_average(network, decay)

    def step(engine, batch):
        with torch.no_grad():
            network.weight.add_(1.0)

    engine = Engine(step)
    handler.attach(engine)
    seen = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(handler.ema_model.weight.detach().clone())
    )
    engine.run(range(steps), max_epochs=1)
    return handler.ema_model, seen


def test_the_first_step_takes_the_weights_then_the_average_lags_behind():
    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    average, seen = _train(network, steps=30, decay=0.9)
    assert float(seen[0]) == pytest.approx(1.0), "no averaging at the first step: a short run exports trained weights"
    assert float(network.weight) == 30.0
    assert 20.0 < float(average.weight) < 30.0, "after the warm-up it averages about the last 1 / (1 - decay) steps"
    assert average is not network and not average.weight.requires_grad


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        weight_average(torch.nn.Linear(1, 1), decay)
