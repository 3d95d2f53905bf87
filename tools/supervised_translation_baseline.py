"""A supervised U-Net baseline for paired image translation (FLAIR -> T1w): how far plain regression gets.

A MONAI ``UNet`` is trained with an MSE loss to predict the target image from the condition image, on the
training split of a paired datalist (``image`` the target, ``flair`` the condition, as ``make-brain-phantoms`` and
``prepare-brain-mri --with_flair`` write them), optionally with a left-right mirrored copy of every pair; then
PSNR, MAE and MS-SSIM (mean and std, the ControlNet evaluation's metrics) are measured on ``eval_split``. A model
trained for MSE estimates the conditional mean, which maximises the expected PSNR: the reference a generative
translation trained on the same pairs is compared with. Core ``SupervisedTrainer``, bf16 autocast where the device
computes it natively.

Usage (from the repository root)::

    python tools/supervised_translation_baseline.py --dataset_dir data/brain_phantoms_demo --epochs 60 \\
        --eval_split validation --output runs/supervised_baseline.json
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import fire
import numpy as np
import torch
from ignite.contrib.handlers import ProgressBar
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureTyped, LoadImaged

from common.data.datalists import load_datalist
from common.data.mirroring import MirroredFlipd, mirrored_copies
from common.engines.precision import autocast, resolve_precision
from common.engines.threads import set_num_threads
from common.io.atomic import write_json
from common.metrics.paired import PairedImageMetrics

DATA_HINT = "Make paired phantoms with `make-brain-phantoms --output_dir DIR`, or `prepare-brain-mri --with_flair`."


def _loader(keys: Sequence[str], mirror: bool) -> Compose:
    transforms = [
        LoadImaged(keys=list(keys), ensure_channel_first=True, image_only=True),
        EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=False),
    ]
    return Compose(transforms + ([MirroredFlipd(keys=list(keys))] if mirror else []))


def supervised_translation_baseline(
    dataset_dir: str,
    output: str | None = None,
    image_key: str = "image",
    condition_key: str = "flair",
    epochs: int = 60,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    channels: Sequence[int] = (32, 64, 128, 256),
    mirror_augmentation: bool = True,
    eval_split: str = "validation",
    train_limit: int | None = None,
    precision: str = "auto",
    num_threads: int | None = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the baseline on ``training``, evaluate it on ``eval_split``; returns (and with ``output`` writes) JSON.

    Result: ``{"metrics": {"psnr": {"mean", "std"}, "mae": ..., "ms_ssim": ...}, "num_slices", "settings",
    "training_minutes"}``. Bad arguments stop before any training.
    """
    if eval_split not in ("validation", "test"):
        raise ValueError(f"eval_split must be 'validation' or 'test', got {eval_split!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(mirror_augmentation, bool):
        raise ValueError(f"mirror_augmentation must be True or False, got {mirror_augmentation!r}")
    keys = [condition_key, image_key]
    train_items = load_datalist(dataset_dir, "training", limit=train_limit, required_keys=keys, how_to_get=DATA_HINT)
    eval_items = load_datalist(dataset_dir, eval_split, required_keys=keys, how_to_get=DATA_HINT)
    set_num_threads(num_threads)
    torch.manual_seed(seed)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = resolve_precision(precision, device)

    train_data = CacheDataset(
        mirrored_copies(train_items, mirror_augmentation), _loader(keys, mirror_augmentation), progress=False
    )
    image_size = tuple(train_data[0][image_key].shape[1:])
    network = UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    ).to(device)

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
        return batch[condition_key].to(device), batch[image_key].to(device)

    def inferer(inputs, network, *args, **kwargs):
        with autocast(resolved, inputs.device):
            return network(inputs).float()

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=DataLoader(train_data, batch_size=batch_size, shuffle=True, drop_last=True),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=learning_rate),
        loss_function=torch.nn.MSELoss(),
        prepare_batch=prepare_batch,
        inferer=inferer,
        optim_set_to_none=True,
    )
    if progress:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": out["loss"].item()})
    start = time.perf_counter()
    trainer.run()
    minutes = (time.perf_counter() - start) / 60

    network.eval()
    metric = PairedImageMetrics(image_size)
    values: dict[str, list[float]] = {}
    eval_data = CacheDataset(eval_items, _loader(keys, False), progress=False)
    with torch.no_grad():
        for batch in DataLoader(eval_data, batch_size=32):
            condition, target = prepare_batch(batch, device)
            pred = inferer(condition, network).clamp(0, 1)
            for name, v in metric(pred.cpu(), target.cpu()).items():
                values.setdefault(name, []).extend(float(x) for x in v)
    result = {
        "split": eval_split,
        "num_slices": len(values["psnr"]),
        "metrics": {
            k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)} for k, v in values.items()
        },
        "settings": {
            "dataset_dir": str(dataset_dir),
            "training_pairs": len(train_items),
            "mirror_augmentation": mirror_augmentation,
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "channels": list(channels),
            "precision": resolved,
            "seed": seed,
        },
        "training_minutes": round(minutes, 2),
    }
    print(json.dumps(result["metrics"]))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_json(output, result)
    return result


def cli() -> None:
    """Entry point of ``supervised-translation-baseline``: bad arguments end with one line and exit status 2."""
    try:
        fire.Fire(supervised_translation_baseline, serialize=lambda _: None)
    except (ValueError, FileNotFoundError) as error:
        print(f"supervised-translation-baseline: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
