"""common.evaluation.translation: per-image metrics, mean +- std, published only when asked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.evaluation.publishing import BundleDocs
from common.evaluation.translation import TranslationReport
from tests.helpers.fakes import FakeEngine


def test_translation_report_writes_results(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "docs").mkdir()
    meta = tmp_path / "configs" / "metadata.json"
    meta.write_text(json.dumps({"name": "x", "eval_metrics": {}}))
    readme = tmp_path / "docs" / "README.md"
    readme.write_text("a\n<!-- evaluation:start -->\nold\n<!-- evaluation:end -->\nb\n")
    provenance = {
        "command": "python -m monai.bundle run ...",
        "demo_weights": True,
        "weights": {"controlnet": {"sha256": "ab" * 32}},
    }
    report = TranslationReport(
        (64, 64),
        condition_key="flair",
        publish_to=BundleDocs(tmp_path, enabled=True, figure="docs/fig.png"),
        provenance=provenance,
        figure_rows=2,
        figure_scale=2,
        reference={"source": "article", "psnr": [26.25, 1.01]},
        metric_prefix="test_",
    )
    report.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        label = torch.rand(2, 1, 64, 64, generator=g)
        engine = FakeEngine(
            [{"flair": torch.rand(1, 64, 64, generator=g)} for _ in range(2)],
            [{"pred": (x + 0.05).clamp(0, 1), "label": x} for x in label],
        )
        report.collect(engine)
    results = report.report()
    assert results["num_test_images"] == 4 and len(results["per_image"]["psnr"]) == 4
    assert json.loads(meta.read_text())["eval_metrics"]["test_psnr"] == results["metrics"]["psnr"]
    text = readme.read_text()
    assert "old" not in text and "26.25 ± 1.01" in text and "MS-SSIM" in text
    assert "demo weights" in text and "python -m monai.bundle run ..." in text
    assert json.loads((tmp_path / "docs" / "evaluation_results.json").read_text())["provenance"] == provenance
    from PIL import Image

    # rows: examples; columns: condition | generated | true; each slice upscaled x2
    assert Image.open(tmp_path / "docs" / "fig.png").size == (2 * 3 * 64, 2 * 2 * 64)


def test_translation_report_without_publishing_writes_nothing(tmp_path):
    """Evaluation computes and logs; the bundle's docs change only when publishing is asked for."""
    (tmp_path / "docs").mkdir()
    report = TranslationReport((64, 64), condition_key="flair", publish_to=BundleDocs(tmp_path, enabled=False))
    report.reset()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    report.collect(
        FakeEngine([{"flair": x[0]}, {"flair": x[1]}], [{"pred": x[0], "label": x[0]}, {"pred": x[1], "label": x[1]}])
    )
    results = report.report()
    assert results["metrics"]["mae"] == 0.0
    assert list(tmp_path.rglob("*")) == [tmp_path / "docs"]


def test_figure_orientation_is_a_parameter():
    report = TranslationReport((64, 64), condition_key="c", display_orientation="ras_axial", figure_rows=1)
    report.reset()
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64) / 4096
    report.collect(FakeEngine([{"c": x[0]}], [{"pred": x[0], "label": x[0]}]))
    np.testing.assert_array_equal(report.examples[0][:, :64], np.flipud(x[0, 0].numpy().T))
    with pytest.raises(ValueError, match="display orientation"):
        TranslationReport((64, 64), display_orientation="sideways")
