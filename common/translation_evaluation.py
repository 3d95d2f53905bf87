"""Evaluation of an image-to-image translation bundle: PSNR, MAE and MS-SSIM per image, as the articles report."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import MAEMetric, PSNRMetric
from PIL import Image

from common.bundle_metadata import update_eval_metrics
from common.evaluation import update_readme_section
from common.io import atomic_path, write_json
from common.metrics import build_ms_ssim

logger = logging.getLogger(__name__)

METRIC_LABELS = {"psnr": "PSNR (dB, max 1.0)", "mae": "MAE", "ms_ssim": "MS-SSIM"}


class PairedImageMetrics:
    """Per-image PSNR (``max_val`` 1.0), MAE and MS-SSIM between ``pred`` and ``label`` ``(B, 1, H, W)``.

    Uses MONAI's metrics with ``reduction="none"`` so that the standard deviation over images can be
    reported beside the mean.
    """

    def __init__(self, image_size: Sequence[int]) -> None:
        self.metrics = {
            "psnr": PSNRMetric(max_val=1.0, reduction="none"),
            "mae": MAEMetric(reduction="none"),
            "ms_ssim": build_ms_ssim(image_size, reduction="none"),
        }

    def __call__(self, pred: torch.Tensor, label: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"psnr", "mae", "ms_ssim"}`` -> arrays ``(B,)``."""
        pred, label = pred.float().clamp(0, 1), label.float()
        return {
            name: metric(pred, label).reshape(pred.shape[0], -1).mean(1).cpu().numpy()
            for name, metric in self.metrics.items()
        }


class TranslationReport:
    """Collect per-image metrics over an evaluator run; report mean ± std to JSON, metadata and README.

    Attach it to a ``SupervisedEvaluator`` whose output holds ``pred`` and ``label`` (the true target
    image) and whose batch holds the condition image. On completion it writes:

    * ``results_path``: means, standard deviations, per-image values, settings and the command;
    * ``metadata_path``: ``eval_metrics`` ``{prefix}psnr`` / ``mae`` / ``ms_ssim`` (means);
    * ``readme_path``: a table between ``<!-- {readme_section}:start/end -->`` with the ``reference``
      values (e.g. the article's) beside ours;
    * ``figure_path``: a PNG with one row per example: condition | generated | true.

    Args:
        image_size: ``(H, W)``, sets the MS-SSIM kernel.
        condition_key: batch key of the condition image (for the figure).
        reference: ``{"psnr": (mean, std), ...}`` with a ``"source"`` entry naming where they come from.
        settings: sampling settings recorded with the results.
        figure_rows: examples in the figure (the first ones of the split).
        figure_scale: integer upscaling of the figure (nearest neighbour), for reading small slices.
        publish: ``False`` only logs the figures (a quick run on a subset must not overwrite the documented ones).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        condition_key: str = "condition",
        results_path: str | None = None,
        metadata_path: str | None = None,
        readme_path: str | None = None,
        readme_section: str = "evaluation",
        figure_path: str | None = None,
        figure_rows: int = 4,
        figure_scale: int = 2,
        reference: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        metric_prefix: str = "",
        command: str = "",
        publish: bool = True,
    ) -> None:
        self.metric_fn = PairedImageMetrics(image_size)
        self.condition_key = condition_key
        self.results_path = results_path
        self.metadata_path = metadata_path
        self.readme_path = readme_path
        self.readme_section = readme_section
        self.figure_path = figure_path
        self.figure_rows = figure_rows
        self.figure_scale = figure_scale
        self.reference = dict(reference or {})
        self.settings = dict(settings or {})
        self.metric_prefix = metric_prefix
        self.command = command
        self.publish = publish
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
                # (H, W) array axes -> display orientation (rows = anterior-posterior), side by side.
                self.examples.append(np.concatenate([np.flipud(np.clip(x, 0, 1).T) for x in images], 1))

    def report(self, _: Engine | None = None) -> dict[str, Any]:
        n = len(self.values["psnr"])
        if n == 0:
            raise RuntimeError("The evaluation saw no image; check the test split of the datalist.")
        mean = {name: round(float(np.mean(v)), 4) for name, v in self.values.items()}
        std = {name: round(float(np.std(v)), 4) for name, v in self.values.items()}
        self.results = {
            "metrics": mean,
            "std": std,
            "num_test_images": n,
            "reference": self.reference,
            "settings": self.settings,
            "command": self.command,
            "per_image": {name: [round(x, 5) for x in v] for name, v in self.values.items()},
        }
        logger.info("Evaluation on %d images: %s", n, {k: f"{mean[k]} ± {std[k]}" for k in mean})
        if not self.publish:
            logger.info(
                "Not publishing (subset or non-test split): results, metadata, README and figure left as they are."
            )
            return self.results
        if self.results_path:
            write_json(self.results_path, self.results)
        if self.metadata_path:
            update_eval_metrics(self.metadata_path, {f"{self.metric_prefix}{k}": v for k, v in mean.items()})
        if self.readme_path:
            update_readme_section(self.readme_path, self.readme_section, self.table())
        if self.figure_path and self.examples:
            self.write_figure(self.figure_path)
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
        return "\n".join(rows) + f"\n\nSettings: {knobs}.\n\nProduced by:\n\n```bash\n{self.command}\n```\n"

    def write_figure(self, path: str) -> None:
        """PNG grid, one row per example (condition | generated | true), display orientation, 8-bit."""
        grid = np.concatenate(self.examples, 0)
        grid = np.kron(grid, np.ones((self.figure_scale, self.figure_scale), dtype=grid.dtype))
        with atomic_path(path) as tmp:
            Image.fromarray((grid * 255).round().astype(np.uint8)).save(tmp)
