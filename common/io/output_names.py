"""Output file names that carry what made the output, and the rule that an existing file is never replaced unasked.

A name is ``<readable part>_seed<seed>_<digest>``: the readable part says what it is (the prompt's start, the
input's name), the digest is 8 hex characters of the sha256 of every setting that changes the image (the full
prompt, guidance, steps, scheduler, eta, image size, the weights' hashes, the input's content). Two requests that
differ anywhere get different names; the same request gets the same name, and is refused when it exists unless
``overwrite`` is set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DIGEST_CHARS = 8


def settings_digest(settings: Mapping[str, Any]) -> str:
    """8 hex characters of the sha256 of ``settings`` as canonical JSON (sorted keys; values JSON can hold)."""
    text = json.dumps(settings, sort_keys=True, default=str, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def check_new_files(paths: Iterable[str | Path], overwrite: bool = False) -> None:
    """Raise ``FileExistsError`` naming the outputs that exist already, unless ``overwrite``; before any work."""
    if overwrite:
        return
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing:
        shown = ", ".join(str(p) for p in existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise FileExistsError(
            f"{len(existing)} output file(s) exist already: {shown}. The same request was run before into this "
            "folder; nothing was written. Pass --overwrite True to replace them, or give another --output_dir."
        )
