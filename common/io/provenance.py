"""What made an output: the weight files (their sha256 and whether they are demo weights) and the command run."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import common
from common.io.weights import sha256sum

#: Entry of an exported weight file that says where the weights come from, e.g. ``{"demo": True, ...}``.
PROVENANCE_KEY = "provenance"


def weights_provenance(files: Mapping[str, str | Path | None]) -> dict[str, dict[str, Any]]:
    """``{name: {"file", "sha256", "demo"}}`` for the weight files that produced an output (``file``: the name).

    ``demo`` is what the file itself declares under ``"provenance"`` (the demo weights shipped in the
    bundles say ``True``); a file that declares nothing is not demo weights. A missing file raises
    ``FileNotFoundError``: outputs never claim weights that are not there. A ``None`` path is an optional file
    this run does not use (no LoRA adapter, say) and is left out.
    """
    record = {}
    for name, path in files.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():  # a pretrained transformers folder: named, not hashed
            record[name] = {"file": path.name, "sha256": None, "demo": False}
            continue
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        declared = state.get(PROVENANCE_KEY, {}) if isinstance(state, dict) else {}
        record[name] = {
            "file": path.name,
            "sha256": sha256sum(path),
            "demo": bool(declared.get("demo", False)),
        }
    return record


def uses_demo_weights(weights: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any weight file of a :func:`weights_provenance` record is demo weights."""
    return any(entry.get("demo") for entry in weights.values())


def command_line() -> str:
    """The command this process runs, as a shell line (``python -m monai.bundle run ...`` for the bundle CLI)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("monai/bundle/__main__.py", "monai\\bundle\\__main__.py")):
        argv = ["python", "-m", "monai.bundle", *argv[1:]]
    return " ".join(_quote(a) for a in argv)


def _quote(arg: str) -> str:
    """Shell quoting that keeps MONAI's list arguments readable: ``"['a.json','b.json']"``."""
    if shlex.quote(arg) == arg:
        return arg
    if not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def output_provenance(bundle: str, version: str, weights: Mapping[str, str | Path]) -> dict[str, Any]:
    """Sidecar fields shared by every generated output: bundle, version, ``common`` version, weights, demo flag."""
    record = weights_provenance(weights)
    return {
        "bundle": bundle,
        "version": version,
        "common_version": common.__version__,
        "weights": record,
        "demo_weights": uses_demo_weights(record),
    }
