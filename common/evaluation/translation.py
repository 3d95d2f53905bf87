"""Evaluation of an image-to-image translation bundle: PSNR, MAE and MS-SSIM mean +- std, as the articles report."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from common.evaluation.publishing import BundleDocs, weights_note
from common.io.atomic import atomic_path
from common.io.display import check_orientation, to_display
from common.metrics.paired import PairedImageMetrics

logger = logging.getLogger(__name__)


METRIC_LABELS = {"psnr": "PSNR (dB, max 1.0)", "mae": "MAE", "ms_ssim": "MS-SSIM"}


class TranslationReport:
    """Collect per-image metrics over an evaluator run; log mean ± std, and publish them when asked.

    Attach it to a ``SupervisedEvaluator`` whose output holds ``pred`` and ``label`` (the true target
    image) and whose batch holds the condition image. On completion it logs the results and hands them to
    ``publish_to`` (``common.evaluation.publishing.BundleDocs``), which writes them only when enabled:
    results JSON (means, standard deviations, per-image values, settings, provenance), ``eval_metrics``
    ``{prefix}psnr`` / ``mae`` / ``ms_ssim`` (means), a README table with the ``reference`` values (e.g. the
    article's) beside ours, and a PNG with one row per example: condition | generated | true.

    Args:
        image_size: ``(H, W)``, sets the MS-SSIM kernel.
        condition_key: batch key of the condition image (for the figure).
        reference: ``{"psnr": (mean, std), ...}`` with a ``"source"`` entry naming where they come from.
        settings: sampling settings recorded with the results.
        figure_rows: examples in the figure (the first ones of the split).
        figure_scale: integer upscaling of the figure (nearest neighbour), for reading small slices.
        display_orientation: how slices are turned in the figure (``common.io.display``).
        provenance: what produced the figures (command, weight hashes, demo or not), recorded with them.
        publish_to: where the figures are published when asked; ``None`` only logs them.
        split: the datalist split evaluated, recorded with the results (only ``test`` is published).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        condition_key: str = "condition",
        figure_rows: int = 4,
        figure_scale: int = 2,
        reference: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        metric_prefix: str = "",
        display_orientation: str = "array",
        provenance: Mapping[str, Any] | None = None,
        publish_to: BundleDocs | None = None,
        split: str = "test",
    ) -> None:
        self.metric_fn = PairedImageMetrics(image_size)
        self.condition_key = condition_key
        self.figure_rows = figure_rows
        self.figure_scale = figure_scale
        self.reference = dict(reference or {})
        self.settings = dict(settings or {})
        self.metric_prefix = metric_prefix
        self.display_orientation = check_orientation(display_orientation)
        self.provenance = dict(provenance or {})
        self.publish_to = publish_to
        self.split = split
        self.values: dict[str, list[float]] = {}
        self.examples: list[np.ndarray] = []
        self.results: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def reset(self, _: Engine | None = None) -> None:
        self.values = {name: [] for name in METRIC_LABELS}
        self.examples = []

    def collect(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        pred = torch.stack([item["pred"] for item in outputs])
        label = torch.stack([item["label"] for item in outputs])
        for name, vals in self.metric_fn(pred, label).items():
            self.values[name].extend(float(v) for v in vals)
        for request, p, t in zip(batch, pred, label, strict=True):
            if len(self.examples) < self.figure_rows:
                images = [
                    np.asarray(torch.as_tensor(x).float().cpu()) for x in (request[self.condition_key][0], p[0], t[0])
                ]
                turned = [to_display(np.clip(x, 0, 1), self.display_orientation) for x in images]
                self.examples.append(np.concatenate(turned, 1))  # side by side

    def report(self, _: Engine | None = None) -> dict[str, Any]:
        n = len(self.values["psnr"])
        if n == 0:
            raise RuntimeError(f"The evaluation saw no image; check the {self.split} split of the datalist.")
        mean = {name: round(float(np.mean(v)), 4) for name, v in self.values.items()}
        std = {name: round(float(np.std(v)), 4) for name, v in self.values.items()}
        self.results = {
            "metrics": mean,
            "std": std,
            "split": self.split,
            "num_test_images": n,
            "reference": self.reference,
            "settings": self.settings,
            "command": self.provenance.get("command", ""),
            "provenance": self.provenance,
            "per_image": {name: [round(x, 5) for x in v] for name, v in self.values.items()},
        }
        logger.info(
            "Evaluation on %d images of the %s split: %s", n, self.split, {k: f"{mean[k]} ± {std[k]}" for k in mean}
        )
        if self.publish_to is not None:
            metrics = {f"{self.metric_prefix}{k}": v for k, v in mean.items()}
            draw = self.write_figure if self.examples else None
            self.publish_to.publish(self.results, metrics, self.table(), draw)
        return self.results

    def table(self) -> str:
        """Markdown table: ours (mean ± std) beside the reference values."""
        m, s, ref = self.results["metrics"], self.results["std"], self.reference
        source = ref.get("source", "reference")
        rows = [f"| metric | this bundle ({self.results['num_test_images']} test slices) | {source} |", "|---|---|---|"]
        for name, label in METRIC_LABELS.items():
            theirs = ref.get(name)
            theirs_text = f"{theirs[0]} ± {theirs[1]}" if theirs else "-"
            rows.append(f"| {label} | {m[name]:.4f} ± {s[name]:.4f} | {theirs_text} |")
        knobs = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        text = "\n".join(rows) + f"\n\nSettings: {knobs}."
        if note := weights_note(self.provenance):
            text += f"\n\n{note}"
        return text + f"\n\nProduced by:\n\n```bash\n{self.results['command']}\n```\n"

    def write_figure(self, path: str | Path) -> None:
        """PNG grid, one row per example (condition | generated | true), display orientation, 8-bit."""
        grid = np.concatenate(self.examples, 0)
        grid = np.kron(grid, np.ones((self.figure_scale, self.figure_scale), dtype=grid.dtype))
        with atomic_path(path) as tmp:
            Image.fromarray((grid * 255).round().astype(np.uint8)).save(tmp)
