"""Temporary copies of a repository bundle that tests may break on purpose."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import REPO_ROOT


def copy_bundle(dst_root: Path, name: str = "brain_t1_ldm", models: bool = True) -> Path:
    """Copy ``bundles/<name>`` to ``dst_root/<name>`` (no runs/, data or caches); ``common`` links to the repo's."""
    src = REPO_ROOT / "bundles" / name
    ignore = ["runs", "data", "output", "__pycache__", "common"] + ([] if models else ["models"])
    dst = dst_root / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore))
    (dst / "common").symlink_to(REPO_ROOT / "common", target_is_directory=True)
    return dst


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Load the JSON file, let ``edit`` change it in place (its return value is ignored), write it back."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))
