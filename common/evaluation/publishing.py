"""Publishing evaluation results on request: the bundle's README section, ``eval_metrics`` of its metadata, results JSON."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import common
from common.io.atomic import atomic_path, write_json
from common.io.provenance import command_line, uses_demo_weights, weights_provenance

logger = logging.getLogger(__name__)


def update_readme_section(readme_path: str, section: str, body: str) -> None:
    """Replace the text between ``<!-- {section}:start -->`` and ``<!-- {section}:end -->`` in a README."""
    path = Path(readme_path)
    text = path.read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no '{start}' ... '{end}' markers for the results.")
    new = pattern.sub(lambda _: f"{start}\n{body}{end}", text)
    with atomic_path(path) as tmp:
        tmp.write_text(new)


def _as_metric(name: str, value: Any, ndigits: int | None) -> float:
    if isinstance(value, bool) or not isinstance(name, str) or not name:
        raise ValueError(f"eval_metrics[{name!r}]: expected a metric name and a number, got {value!r}")
    try:
        number = float(value)  # accepts Python, NumPy and 0-d torch numbers
    except (TypeError, ValueError) as e:
        raise ValueError(f"eval_metrics[{name!r}]: {value!r} is not a number") from e
    if not math.isfinite(number):
        raise ValueError(f"eval_metrics[{name!r}]: {number} is not finite")
    return round(number, ndigits) if ndigits is not None else number


def update_eval_metrics(
    metadata_path: str | os.PathLike,
    metrics: Mapping[str, float],
    *,
    replace: bool = False,
    ndigits: int | None = None,
) -> dict[str, Any]:
    """Write ``metrics`` into the ``eval_metrics`` of a ``metadata.json``, atomically; return the new metadata.

    Existing metrics keep their position and get the new value, new metrics are appended, other metrics stay
    (all are dropped first with ``replace=True``). Every other key of the file keeps its value and order.
    Values must be finite numbers (NumPy scalars and 0-d tensors are converted to ``float``), rounded to
    ``ndigits`` if given. Nothing is written if a value is invalid.
    """
    path = Path(metadata_path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    converted = {name: _as_metric(name, value, ndigits) for name, value in metrics.items()}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: metadata must be a JSON object")
    existing = data.get("eval_metrics")
    if existing is not None and not isinstance(existing, dict):
        raise ValueError(f"{path}: eval_metrics must be an object, got {type(existing).__name__}")
    merged = {} if replace or existing is None else dict(existing)
    merged.update(converted)
    data["eval_metrics"] = merged
    write_json(path, data)
    return data


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or inf replaced by ``None`` (JSON ``null``: not computable), at any depth.

    A metric can be undefined on a small run (the spread of one value); strict JSON has no NaN.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def check_publishable(publish: bool, complete: bool, enough_samples: bool = True) -> None:
    """Refuse, before any work, to publish the figures of a partial run (they would replace the documented ones)."""
    if not isinstance(publish, bool):
        raise ValueError(f"`publish` must be True or False, got {publish!r}.")
    if publish and not complete:
        raise ValueError(
            "--publish True writes the bundle's documented results, which must come from the whole test split: "
            "remove --test_limit and --eval_split (or leave --publish False to only compute and log)."
        )
    if publish and not enough_samples:
        raise ValueError(
            "--publish True needs at least 100 generated samples for diversity and FID: raise --eval_num_samples "
            "(or leave --publish False to only compute and log)."
        )


def run_provenance(weight_files: Mapping[str, str | Path], bundle_root: str | Path | None = None) -> dict[str, Any]:
    """What produced a set of results: the command actually run, the weight files (sha256, demo or not).

    A command run from inside the bundle folder is recorded as ``cd <bundle folder name> && <command>``, so that it
    can be repeated from the folder holding the bundle (as the Model Zoo lays bundles out).
    """
    weights = weights_provenance(weight_files)
    command = command_line()
    if bundle_root is not None and Path(bundle_root).resolve() == Path.cwd().resolve():
        command = f"cd {Path.cwd().name} && {command}"
    return {
        "command": command,
        "demo_weights": uses_demo_weights(weights),
        "weights": weights,
        "common_version": common.__version__,
    }


class BundleDocs:
    """Where evaluation results are published, and whether they are: a bundle's README, metadata and results.

    Evaluation computes and logs; only when ``enabled`` (``--publish True``) does :meth:`publish` write

    * ``results``: the results JSON (``docs/evaluation_results.json``);
    * ``metadata``: ``eval_metrics`` of ``configs/metadata.json``;
    * ``readme``: the table between ``<!-- {section}:start -->`` and ``<!-- {section}:end -->``;
    * ``figure``: a picture of examples, when the evaluation draws one.

    Paths are relative to ``bundle_root``; ``None`` skips one.
    """

    def __init__(
        self,
        bundle_root: str | Path,
        enabled: bool = False,
        results: str | None = "docs/evaluation_results.json",
        metadata: str | None = "configs/metadata.json",
        readme: str | None = "docs/README.md",
        figure: str | None = None,
        section: str = "evaluation",
    ) -> None:
        root = Path(bundle_root)
        self.enabled = bool(enabled)
        self.results, self.metadata, self.readme, self.figure = (
            None if p is None else root / p for p in (results, metadata, readme, figure)
        )
        self.section = section

    def publish(
        self,
        results: Mapping[str, Any],
        metrics: Mapping[str, float],
        table: str,
        draw_figure: Callable[[Path], None] | None = None,
    ) -> bool:
        """Write everything when enabled; return whether anything was written."""
        if not self.enabled:
            logger.info("Results computed and logged, not published (pass --publish True to update the bundle docs).")
            return False
        if self.results is not None:
            write_json(self.results, finite_or_none(results))
        if self.metadata is not None:
            update_eval_metrics(self.metadata, metrics)
        if self.readme is not None:
            update_readme_section(str(self.readme), self.section, table)
        if self.figure is not None and draw_figure is not None:
            draw_figure(self.figure)
        logger.info(
            "Published the results to %s", ", ".join(str(p) for p in (self.results, self.metadata, self.readme) if p)
        )
        return True


def weights_note(provenance: Mapping[str, Any]) -> str:
    """One line for a results table: which weights were evaluated (demo or not, with short hashes)."""
    weights = provenance.get("weights", {})
    if not weights:
        return ""
    kind = "demo weights (not for research)" if provenance.get("demo_weights") else "weights"
    hashes = ", ".join(f"{name} {(entry.get('sha256') or 'folder')[:12]}" for name, entry in weights.items())
    return f"Evaluated {kind}: {hashes}."
