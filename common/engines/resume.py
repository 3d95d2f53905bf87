"""Resuming training: finding the last complete checkpoint and restoring it safely."""

from __future__ import annotations

import logging
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.networks.utils import copy_model_state

from common.io.weights import load_weights

logger = logging.getLogger(__name__)


_STEP = re.compile(r"=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "") -> str | None:
    """The newest complete ``{prefix}*checkpoint*=N.pt`` in ``ckpt_dir`` by step ``N``, or ``None`` (fresh run).

    A run killed while writing a checkpoint can leave a truncated file; such files (not a complete zip
    archive, as ``torch.save`` writes) are skipped with a warning and the previous checkpoint is used.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob(f"{prefix}*checkpoint*.pt") if (m := _STEP.search(p.name))]
    for _, path in sorted(found, reverse=True):
        if zipfile.is_zipfile(path):
            return str(path)
        logger.warning("Skipping incomplete checkpoint %s (interrupted while saving).", path)
    return None


class SafeCheckpointLoader:
    """Drop-in for ``monai.handlers.CheckpointLoader`` that reads the file through ``common.io.weights.load_weights``.

    Same arguments and behaviour as MONAI's loader (load when the engine starts, restore every object of
    ``load_dict`` with ignite's ``Checkpoint.load_objects``, keep the engine's ``max_epochs``), plus an
    optional ``sha256`` of the checkpoint. Loading is ``weights_only=True``; a truncated, foreign or
    tampered file, or a checkpoint lacking an object of ``load_dict``, fails with an error naming the file.
    Restoring the trainer's state makes a resumed run continue at the epoch after the checkpoint's.

    Args:
        load_path: the checkpoint file (e.g. ``checkpoint_epoch=7.pt`` written by ``CheckpointSaver``).
        load_dict: ``{name: object}`` to restore (networks, optimizers, the trainer, objects with a state dict).
        name: logger name; ``None`` logs through the engine's logger.
        map_location: where tensors are loaded (device, string or mapping, as for ``torch.load``).
        strict: strict ``load_state_dict`` for networks.
        strict_shape: ``False`` skips network layers whose shape differs and loads only the networks (as MONAI).
        sha256: expected hex digest of the file, checked before loading when given.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: Mapping[str, Any],
        name: str | None = None,
        map_location: str | torch.device | Mapping | None = None,
        strict: bool = True,
        strict_shape: bool = True,
        sha256: str | None = None,
    ) -> None:
        if load_path is None:
            raise ValueError(
                "SafeCheckpointLoader: `load_path` is None; disable the handler when there is nothing to resume."
            )
        if not load_dict:
            raise ValueError("SafeCheckpointLoader: `load_dict` is empty; give the objects to restore.")
        if strict and not strict_shape:
            warnings.warn("as `strict_shape` is False, `strict` is set to False.", stacklevel=2)
            strict = False
        self.load_path = str(load_path)
        self.load_dict = dict(load_dict)
        self._name = name
        self.logger = logging.getLogger(name)
        self.map_location = map_location
        self.strict = strict
        self.strict_shape = strict_shape
        self.sha256 = sha256

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def _checkpoint(self) -> dict[str, Any]:
        checkpoint = load_weights(self.load_path, sha256=self.sha256, map_location=self.map_location or "cpu")
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and first not in checkpoint:
            return {first: checkpoint}  # a bare state dict for a single object
        missing = [key for key in self.load_dict if key not in checkpoint]
        for key in [k for k in missing if getattr(self.load_dict[k], "optional_in_checkpoint", False)]:
            self.logger.warning(
                f"Checkpoint {self.load_path} has no '{key}' (written by an older version); not restored."
            )
            missing.remove(key)
        if missing:
            raise KeyError(
                f"Checkpoint {self.load_path} has no {missing} (it holds {sorted(checkpoint)}): it was written by "
                "another config; resume from a checkpoint of this run or start afresh with --resume False."
            )
        return checkpoint

    def __call__(self, engine: Engine) -> None:
        checkpoint = self._checkpoint()
        to_load = {key: obj for key, obj in self.load_dict.items() if key in checkpoint}
        if not self.strict_shape:
            for key, obj in self.load_dict.items():
                if isinstance(obj, torch.nn.Module):
                    checkpoint[key] = copy_model_state(obj, checkpoint[key], inplace=False)[0]
                else:
                    warnings.warn(
                        f"`strict_shape` is False: '{key}' is not a network and is not restored.", stacklevel=2
                    )
                    to_load.pop(key)
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"Checkpoint {self.load_path} is at epoch {engine.state.epoch}, beyond this run's max_epochs "
                f"({prior_max_epochs}): raise max_epochs to train further, or start afresh with --resume False."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


class GradScalerState:
    """The AMP gradient scalers of a trainer as one object to checkpoint and restore.

    MONAI keeps a trainer's ``GradScaler`` (``SupervisedTrainer.scaler``; ``state.g_scaler`` and ``state.d_scaler``
    of adversarial trainers) out of the trainer's ``state_dict``, so without this a resumed AMP run would restart
    its loss scale from 65536 and skip steps while it backs off again. Without AMP there is no scaler and the
    state is empty, so a CPU checkpoint resumes on a GPU and the other way round. Checkpoints written before
    this object existed resume with a warning (``optional_in_checkpoint``).
    """

    optional_in_checkpoint = True

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def _scalers(self) -> dict[str, Any]:
        found = {}
        if getattr(self.trainer, "scaler", None) is not None:
            found["scaler"] = self.trainer.scaler
        for key in ("g_scaler", "d_scaler"):
            if (scaler := getattr(self.trainer.state, key, None)) is not None:
                found[key] = scaler
        return found

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: scaler.state_dict() for name, scaler in self._scalers().items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        for name, scaler in self._scalers().items():
            if state.get(name):  # an empty state: the checkpoint was written without AMP
                scaler.load_state_dict(dict(state[name]))
