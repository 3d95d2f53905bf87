"""An upper bound for FLAIR-to-T1w models on a phantom data set, measured with the generator itself.

For every subject of a split, the generator re-renders the T1w from the same anatomy (hence the same
FLAIR) with freshly drawn T1w contrast, bias field and noise, from the data set's intensity model (read from its
datalist; data sets written before the models were named used ``uncorrected``): another T1w of the same
anatomy.
PSNR, MAE and MS-SSIM between it and the real T1w are what a sampler that knew the anatomy exactly would score:
an upper bound, not a target. A model sees the anatomy only through the FLAIR's own noise, bias field and partial
volumes (its grey-white contrast is a quarter to three quarters of the T1w's), so a model trained on a finite
training set stays below it: flair_to_t1_controlnet's README ("How far the demo is from what the phantoms allow")
measures how far a supervised U-Net gets.

Usage::

    python tools/phantom_translation_ceiling.py --dataset_dir data/brain_phantoms_demo --split test \\
        --output bundles/flair_to_t1_controlnet/docs/phantom_ceiling.json
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
import torch

from common.data.brain.phantoms import BrainPhantomGenerator, PhantomGeometry
from common.io.atomic import write_json
from common.metrics.paired import PairedImageMetrics


def phantom_translation_ceiling(
    dataset_dir: str, split: str = "test", seed: int = 1, output: str | None = None
) -> dict[str, dict[str, float]]:
    """Mean ± std of PSNR / MAE / MS-SSIM between real and re-drawn T1w slices of ``split``; optional JSON."""
    datalist = json.loads((Path(dataset_dir) / "datalist.json").read_text())
    if datalist.get("generator") != "common.data.brain_phantoms":
        raise SystemExit(
            f"{dataset_dir} was not made by tools/make_brain_phantoms.py; the ceiling needs the generator."
        )
    intensity = datalist.get("intensity_model", "uncorrected")
    generator = BrainPhantomGenerator(PhantomGeometry(**datalist["geometry"]), datalist["seed"], intensity)
    metric = PairedImageMetrics(datalist["geometry"]["slice_shape"])
    values: dict[str, list[float]] = {}
    for sid in datalist["subjects"][split]:
        index = int(sid.split("-")[1])
        real = torch.from_numpy(generator.subject(index).t1)[:, None]
        redrawn = torch.from_numpy(generator.resample_t1(index, seed))[:, None]
        for name, v in metric(redrawn, real).items():
            values.setdefault(name, []).extend(float(x) for x in v)
    summary = {
        name: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)} for name, v in values.items()
    }
    result = {
        "split": split,
        "num_slices": len(values["psnr"]),
        "seed": seed,
        "intensity_model": intensity,
        "metrics": summary,
    }
    if output:
        write_json(output, result)
    return result


def cli() -> None:
    """Entry point of ``phantom-translation-ceiling``."""
    fire.Fire(phantom_translation_ceiling)


if __name__ == "__main__":
    cli()
