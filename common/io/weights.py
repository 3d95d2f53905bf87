"""Loading weight files safely: ``weights_only=True``, checksums, clear errors for missing or foreign files."""

from __future__ import annotations

import hashlib
import logging
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_weights(
    path: str | Path, sha256: str | None = None, how_to_get: str = "", map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; check its sha256 when known.

    Raises:
        FileNotFoundError: the file is missing; the message says ``how_to_get`` it.
        ValueError: checksum mismatch, or a truncated / foreign file that torch cannot read as weights.
    """
    path = Path(path)
    if not path.is_file():
        hint = f" {how_to_get}" if how_to_get else ""
        if not path.is_absolute():  # the usual cause: a bundle run from another folder, where "." is not the bundle
            hint += (
                f" The path is relative to the current folder ({Path.cwd()}): run from the bundle's folder, or pass "
                "--bundle_root PATH_TO_THE_BUNDLE."
            )
        raise FileNotFoundError(f"Weights file not found: {path}.{hint}")
    if sha256 is not None and (actual := sha256sum(path)) != sha256.lower():
        raise ValueError(f"Checksum mismatch for {path}: expected sha256 {sha256}, got {actual}. Re-download it.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not a readable PyTorch weights file (truncated download, or not a state dict): {err}"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of weights.")
    return state


def load_network(network: torch.nn.Module, path: str | Path, key: str | None = None, **kwargs: Any) -> torch.nn.Module:
    """Load weights from ``path`` (entry ``key`` of a multi-object checkpoint if given) into ``network``; return it."""
    state = load_weights(path, **kwargs)
    if key is not None:
        if key not in state:
            raise KeyError(f"{path} has no entry '{key}'; it holds {sorted(state)}.")
        state = state[key]
    network.load_state_dict(state)
    return network


def load_state(network: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """``network.load_state_dict(state)`` (strict) returning the network, for config expressions."""
    network.load_state_dict(state)
    return network


def state_fingerprint(state: Mapping[str, torch.Tensor], prefixes: Sequence[str] | None = None) -> str:
    """sha256 over the names, shapes, dtypes and values of a state dict (only keys starting with ``prefixes``).

    It identifies weights independently of how the file was saved: the same tensors give the same fingerprint.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        if prefixes is not None and not name.startswith(tuple(prefixes)):
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
