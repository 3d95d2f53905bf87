"""File writing helpers: every output of the project is written to a temporary name, then renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` only if the block succeeds.

    The temporary file has the final file name inside a hidden temporary folder, so writers that infer
    the format from the extension (``.nii.gz``, ``.png``) or embed the name (gzip) behave as for ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp_path = tmp_dir / path.name
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, strict JSON (a NaN or inf is a ``ValueError``, never invalid JSON), atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check, before any work, that outputs can be written under ``path``; nothing is created.

    The folder may not exist yet (it is made at the first write); then its nearest existing parent must be a
    writable folder.

    Raises:
        ValueError: ``path`` or a parent is a file, or the folder that would hold the outputs is not writable.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return path
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ValueError(f"Output folder {path} {what}: give --output_dir a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"Output folder {path} cannot be written ({existing} is read-only): give another --output_dir."
        )
    return path
