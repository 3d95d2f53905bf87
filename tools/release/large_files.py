"""A bundle's ``large_files.yml``: the files that are published separately from the bundle zip.

Zoo format (``large_files.yml``, ``.yaml`` or ``.json`` at the bundle root, as ``monai.bundle.download_large_files``
reads it)::

    large_files:
      - path: "models/model.pt"      # relative to the bundle root
        url: "https://..."
        hash_val: "<hex digest>"      # may be empty while no release exists
        hash_type: "sha256"           # md5, sha1, sha256 or sha512

Packaging (``tools/package_bundles.py``) puts the entries that exist locally into the zip, and verification
(``tools/verify_bundles.py``) checks their digests with :func:`check_large_file`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["LARGE_FILE_NAMES", "LargeFile", "find_large_files_config", "read_large_files", "file_digest"]

#: File names MONAI's ``download_large_files`` looks for, in its order.
LARGE_FILE_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")
SUPPORTED_HASHES = ("md5", "sha1", "sha256", "sha512")


def file_digest(path: str | Path, hash_type: str = "sha256") -> str:
    """Hex digest of a file (``hash_type``: md5, sha1, sha256 or sha512)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, hash_type.lower()).hexdigest()


@dataclass(frozen=True)
class LargeFile:
    """One entry of ``large_files.yml``."""

    path: str
    url: str = ""
    hash_val: str = ""
    hash_type: str = "sha256"

    def local_path(self, bundle_root: str | Path) -> Path:
        """Where the entry lives inside ``bundle_root``; raises ``ValueError`` for a path leaving the bundle."""
        root = Path(bundle_root).resolve()
        target = (root / self.path).resolve()
        if not target.is_relative_to(root):
            raise ValueError(f"large file path {self.path!r} points outside the bundle folder {root}")
        return target

    def check(self, bundle_root: str | Path) -> str | None:
        """``None`` when the local file matches ``hash_val`` (or there is nothing to check), else the problem.

        Nothing to check: the file is not present locally, or the entry has no ``hash_val``.
        """
        path = self.local_path(bundle_root)
        if not path.exists() or not self.hash_val:
            return None
        hash_type = (self.hash_type or "sha256").lower()
        if hash_type not in SUPPORTED_HASHES:
            return f"{self.path}: unsupported hash_type {self.hash_type!r} (use one of {', '.join(SUPPORTED_HASHES)})"
        if path.is_dir():
            return f"{self.path}: is a folder but has a hash_val; hashes apply to single files, list its files instead"
        actual = file_digest(path, hash_type)
        if actual != self.hash_val.lower():
            return (
                f"{self.path}: {hash_type} mismatch (large_files.yml says {self.hash_val}, the local file has "
                f"{actual}); re-download it from {self.url or 'its source'} or update hash_val"
            )
        return None


def find_large_files_config(bundle_root: str | Path) -> Path | None:
    """The bundle's large-files config (``large_files.yml``, ``.yaml`` or ``.json``), or ``None``."""
    for name in LARGE_FILE_NAMES:
        if (path := Path(bundle_root) / name).is_file():
            return path
    return None


def _entry(raw: Any, index: int, source: Path) -> LargeFile:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or not raw["path"]:
        raise ValueError(f"{source}: entry {index} of large_files needs a non-empty 'path', got {raw!r}")
    return LargeFile(
        path=raw["path"],
        url=str(raw.get("url") or ""),
        hash_val=str(raw.get("hash_val") or ""),
        hash_type=str(raw.get("hash_type") or "sha256"),
    )


def read_large_files(bundle_root: str | Path) -> list[LargeFile]:
    """Entries of the bundle's large-files config; empty when it has none. Raises ``ValueError`` if malformed."""
    source = find_large_files_config(bundle_root)
    if source is None:
        return []
    with open(source, encoding="utf-8") as f:
        content = yaml.safe_load(f) or {}  # YAML parses the .json variant too
    entries = content.get("large_files", []) if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a top-level 'large_files' list")
    return [_entry(raw, i, source) for i, raw in enumerate(entries)]
