"""Test helper: records which images each distributed rank trained on."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from ignite.engine import Engine, Events


class BatchRecorder:
    """Append the file names of every training batch; write ``rank<N>.json`` when the run completes."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.names: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def record(self, engine: Engine) -> None:
        batch = engine.state.batch
        self.names.extend(f"{s}_slice{int(i)}" for s, i in zip(batch["subject"], batch["slice_index"], strict=True))

    def write(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(self.names))
