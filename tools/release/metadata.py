"""Offline validation and editing of a bundle's ``configs/metadata.json`` (MONAI Model Zoo format).

``monai.bundle.verify_metadata`` downloads the schema named in the metadata's ``schema`` field. This module
validates without a network, against ``common/schemas/meta_schema_20240725.json``: a JSON Schema written
by this project that encodes the rules of the zoo's ``meta_schema_20240725.json`` (slightly stricter, so a
document that passes here passes the zoo schema). On top of the schema it checks what JSON Schema cannot
say: ``version`` has a ``changelog`` entry, ``eval_metrics`` values are finite numbers, no key is
duplicated in the file.

The same schema file also works with MONAI's own verifier, offline, because ``download_url`` skips an
existing file: ``monai.bundle.verify_metadata(meta_file=..., filepath=str(SCHEMA_PATH))``.

Command line: ``python -m tools.release.metadata bundles/*/configs/metadata.json`` prints every problem and
exits with status 1 if there is any.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

__all__ = [
    "SCHEMA_PATH",
    "SCHEMA_NAME",
    "ZOO_SCHEMA_URL",
    "load_schema",
    "validate_metadata",
    "check_metadata",
]

SCHEMA_NAME = "meta_schema_20240725.json"
#: Local schema encoding the zoo rules; used for every validation in this module.
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / SCHEMA_NAME
#: What a bundle's ``schema`` field should hold (the URL the zoo and ``verify_metadata`` use).
ZOO_SCHEMA_URL = f"https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/{SCHEMA_NAME}"


@lru_cache(maxsize=4)
def _load_schema_cached(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.validators.validator_for(schema).check_schema(schema)
    return schema


def load_schema(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Return the metadata JSON Schema (``SCHEMA_PATH`` unless ``path`` is given), checked to be a valid schema."""
    return _load_schema_cached(str(Path(path or SCHEMA_PATH).resolve()))


def _format_path(parts: Sequence[Any]) -> str:
    """``['network_data_format', 'inputs', 'image']`` -> ``network_data_format.inputs.image``; indices as ``[i]``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(str(part))}]"
    return out or "(root)"


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.load`` hook keeping key order and recording duplicated keys (JSON keeps only the last one)."""
    result: dict[str, Any] = {}
    duplicates = []
    for key, value in pairs:
        if key in result:
            duplicates.append(key)
        result[key] = value
    if duplicates:
        result["__duplicate_keys__"] = duplicates
    return result


def _collect_duplicates(node: Any, path: list[Any], problems: list[str]) -> Any:
    """Remove the duplicate-key markers left by ``_reject_duplicates`` and report them, naming the path."""
    if isinstance(node, dict):
        for key in node.pop("__duplicate_keys__", []):
            problems.append(f"{_format_path([*path, key])}: key appears more than once (JSON keeps only the last)")
        for key, value in node.items():
            _collect_duplicates(value, [*path, key], problems)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect_duplicates(value, [*path, i], problems)
    return node


def _load(metadata: str | os.PathLike | Mapping[str, Any], problems: list[str]) -> dict[str, Any] | None:
    if isinstance(metadata, Mapping):
        return dict(metadata)
    path = Path(metadata)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        problems.append(f"(root): {path} is not valid JSON: {e}")
        return None
    _collect_duplicates(data, [], problems)
    if not isinstance(data, dict):
        problems.append(f"(root): must be a JSON object, got {type(data).__name__}")
        return None
    return data


def _schema_problems(data: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    problems = []
    errors = sorted(validator.iter_errors(data), key=lambda e: ([str(p) for p in e.absolute_path], e.message))
    for error in errors:
        path = list(error.absolute_path)
        if error.validator == "required":
            # one error per missing key; the message is "'<key>' is a required property"
            missing = [k for k in error.validator_value if isinstance(error.instance, dict) and k not in error.instance]
            named = [k for k in missing if repr(k) in error.message] or missing
            for key in named[:1]:
                problems.append(f"{_format_path([*path, key])}: required field is missing")
        else:
            problems.append(f"{_format_path(path)}: {error.message}")
    # `network_data_format` also matches the `*_data_format` pattern: the same error can come twice
    return list(dict.fromkeys(problems))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_metadata(
    metadata: str | os.PathLike | Mapping[str, Any], schema_path: str | os.PathLike | None = None
) -> list[str]:
    """Return every problem of a bundle metadata (a ``metadata.json`` path or its loaded dict); empty if valid.

    Each problem is one human-readable line starting with the field path it concerns, e.g.
    ``network_data_format.inputs.image.value_range: required field is missing``.

    Checks: the JSON Schema (``schema_path``, default ``SCHEMA_PATH``); the ``schema`` field names
    ``meta_schema_20240725.json``; ``version`` is a key of ``changelog``; ``eval_metrics`` values are finite
    numbers; no key appears twice in the file. Raises ``FileNotFoundError`` if the path does not exist.
    """
    problems: list[str] = []
    data = _load(metadata, problems)
    if data is None:
        return problems
    problems.extend(_schema_problems(data, load_schema(schema_path)))

    schema_url = data.get("schema")
    if isinstance(schema_url, str) and schema_url and not schema_url.endswith(SCHEMA_NAME):
        problems.append(
            f"schema: {schema_url!r} is not {SCHEMA_NAME}, the schema these rules encode; use {ZOO_SCHEMA_URL!r}"
        )

    version, changelog = data.get("version"), data.get("changelog")
    if isinstance(version, str):
        if changelog is None:
            problems.append(f"changelog: missing; it must have an entry for version {version!r}")
        elif isinstance(changelog, Mapping) and version not in changelog:
            problems.append(f"changelog: has no entry for version {version!r} (entries: {list(changelog)})")

    metrics = data.get("eval_metrics")
    if isinstance(metrics, Mapping):
        for name, value in metrics.items():
            if not _is_number(value):
                problems.append(f"{_format_path(['eval_metrics', name])}: {value!r} is not a number")
            elif not math.isfinite(value):
                problems.append(f"{_format_path(['eval_metrics', name])}: {value!r} is not finite")
    return problems


def check_metadata(
    metadata: str | os.PathLike | Mapping[str, Any], schema_path: str | os.PathLike | None = None
) -> None:
    """Raise ``ValueError`` listing every problem ``validate_metadata`` finds (one per line); return if valid."""
    problems = validate_metadata(metadata, schema_path)
    if problems:
        where = "metadata" if isinstance(metadata, Mapping) else f"metadata file {metadata}"
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{where} has {len(problems)} problem(s) against {SCHEMA_NAME}:\n{lines}")


def main(*paths: str) -> None:
    """Validate each metadata file given; print its problems; exit with status 1 if any file has problems."""
    if not paths:
        raise SystemExit("usage: python -m tools.release.metadata METADATA_JSON [METADATA_JSON ...]")
    failed = False
    for path in paths:
        try:
            problems = validate_metadata(path)
        except FileNotFoundError as e:
            problems = [str(e)]
        failed = failed or bool(problems)
        print(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  - {problem}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
