"""Train the phantom chest X-ray finding classifier: condition-adherence scorer and FID backbone of the CXR demo.

A :class:`~common.networks.feature_extractors.PhantomFeatureNet` learns the six phantom findings
(:data:`common.evaluation.findings.FINDING_LABELS`) from the ``training`` split of a chest X-ray phantom datalist
(``tools/make_cxr_phantoms.py``) with a binary cross-entropy loss on its logits. Targets are the facts of each
image (a finding is present when ``facts["present"]`` lists it, subtle ones included), not the report labels.
Augmentation is light and never mirrors (laterality matters for effusion, pneumothorax, lobes, devices): a
small affine (rotation, shift, scale), gamma, blur and Gaussian noise. The epoch with the best mean validation
AUROC (then the lowest validation loss) is kept; its per-finding validation and test AUROC are printed: the
ceiling that the condition-adherence metric can reach on generated images.

**Orientation.** Images are read exactly as the bundle reads them, with MONAI
``LoadImaged(keys="image", ensure_channel_first=True)``: for a PNG that is ``(1, W, H)`` (MONAI's PIL reader
puts the image's columns first, so the first spatial axis runs from the patient's right to the left, the second
from the top of the chest down), then scaled from [0, 255] to [0, 1]. Score images in that same layout.

Output (written atomically; refused if it exists, unless ``--overwrite``), loadable with
``common.evaluation.findings.FindingClassifier.from_weights``, ``build_feature_extractor("phantom", path)`` and
``common.networks.architecture.load_network(path, "feature_network")``::

    {"feature_network": state_dict, "architectures": {"feature_network": {"network": "PhantomFeatureNet", ...}},
     "network_config": {"channels", "depths", "num_targets"}, "targets": FINDING_LABELS, "outputs": "logits",
     "image_size": [W, H], "image_layout": "...", "validation_auroc": {...}, "test_auroc": {...}, "epoch": best,
     "seed": seed, "provenance": {"demo": True, "trained_on": dataset_dir}}

Usage (from the repository root)::

    python tools/train_finding_classifier.py --dataset_dir data/cxr_phantoms --output /tmp/finding_classifier.pt \\
        [--epochs 60] [--batch_size 32] [--seed 0] [--num_threads 1] [--overwrite]
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    Compose,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    ScaleIntensityRanged,
)
from monai.utils import set_determinism

from common.data.datalists import load_datalist
from common.evaluation.findings import FINDING_LABELS, finding_auroc, targets_of_entries
from common.io.atomic import atomic_path
from common.io.provenance import PROVENANCE_KEY
from common.networks.architecture import ARCHITECTURES_KEY, architecture_records, build_network
from common.networks.feature_extractors import PhantomFeatureNet

#: Entry of the output file that holds the network (the phantom feature network's, so its loaders read it).
NETWORK_KEY = "feature_network"
IMAGE_LAYOUT = (
    "MONAI LoadImaged(keys='image', ensure_channel_first=True) of the PNG, / 255: (1, W, H), "
    "first spatial axis from the patient's right to the left, second from the top down"
)


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The output path; refuses, before any work, a folder or an existing file unless ``overwrite``."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder: give the path of the weights file to write.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it.")
    return path


def load_transforms() -> list:
    """Read an entry's PNG as the bundle does: ``image`` ``(1, W, H)`` float32 in [0, 1]; ``target`` ``(F,)``."""
    return [
        LoadImaged(keys="image", ensure_channel_first=True, image_only=True, dtype=np.float32),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys=("image", "target"), dtype=torch.float32, track_meta=False),
    ]


def augment_transforms(max_rotate_deg: float = 4.0, max_shift: int = 4, max_scale: float = 0.05) -> list:
    """Light training augmentation, never a mirror: a finding's side is part of the truth."""
    return [
        RandAffined(
            keys="image",
            prob=0.8,
            rotate_range=math.radians(max_rotate_deg),
            translate_range=(max_shift, max_shift),
            scale_range=(max_scale, max_scale),
            padding_mode="border",  # the body reaches the image edges: zeros would draw a fake air band
        ),
        RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.8, 1.25)),
        # Generated demo images are softer than phantoms: a little blur keeps the scores from keying on sharpness.
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.25, 0.8), sigma_y=(0.25, 0.8)),
        RandGaussianNoised(keys="image", prob=0.5, std=0.015),
        Lambdad(keys="image", func=lambda x: x.clamp(0.0, 1.0)),
    ]


def split_items(dataset_dir: str, key: str, limit: int | None = None) -> list[dict[str, Any]]:
    """``[{"image": path, "target": (F,) 0/1}]`` of split ``key`` of a phantom datalist."""
    entries = load_datalist(dataset_dir, key, limit=limit)
    targets = targets_of_entries(entries)
    return [{"image": entry["image"], "target": target} for entry, target in zip(entries, targets, strict=True)]


def has_split(dataset_dir: str, key: str) -> bool:
    """Whether the datalist of ``dataset_dir`` has a non-empty split ``key``."""
    data = json.loads((Path(dataset_dir) / "datalist.json").read_text())
    return bool(data.get(key))


def load_arrays(items: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, W, H)`` float32 in [0, 1] and targets ``(N, F)`` of ``items``, unaugmented."""
    transform = Compose(load_transforms())
    loaded = [transform(dict(item)) for item in items]
    return torch.stack([d["image"] for d in loaded]), torch.stack([d["target"] for d in loaded])


@torch.no_grad()
def predict_logits(network: PhantomFeatureNet, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits ``(N, F)`` of ``images`` ``(N, 1, W, H)`` in eval mode."""
    network.eval()
    return torch.cat([network(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def mean_auroc(aurocs: Mapping[str, float | None]) -> float:
    """Mean over the findings whose AUROC is defined (``-inf`` if none is: any epoch beats it)."""
    defined = [v for v in aurocs.values() if v is not None]
    return float(np.mean(defined)) if defined else -math.inf


def format_auroc(aurocs: Mapping[str, float | None]) -> str:
    return ", ".join(f"{name} {'n/a' if v is None else f'{v:.3f}'}" for name, v in aurocs.items())


def train_epoch(
    network: PhantomFeatureNet,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: torch.nn.Module,
) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    network.train()
    total, count = 0.0, 0
    for batch in loader:
        images, targets = batch["image"], batch["target"]
        loss = loss_fn(network(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach().item() * len(images)
        count += len(images)
    return total / max(count, 1)


@dataclass
class Evaluation:
    """Validation result of one epoch."""

    epoch: int
    loss: float
    auroc: dict[str, float | None]

    @property
    def rank(self) -> tuple[float, float]:
        """Higher is better: mean AUROC first, then the lower loss (AUROC saturates on small validation sets)."""
        return mean_auroc(self.auroc), -self.loss


def evaluate(
    network: PhantomFeatureNet, images: torch.Tensor, targets: torch.Tensor, batch_size: int, epoch: int
) -> Evaluation:
    logits = predict_logits(network, images, batch_size)
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))
    return Evaluation(epoch, loss, finding_auroc(logits, targets))


def save_classifier(
    path: Path, network: PhantomFeatureNet, state: Mapping[str, torch.Tensor], record: Mapping[str, Any]
) -> None:
    """Write the weights file atomically: the state dict, its architecture record, and ``record``."""
    checkpoint = {
        NETWORK_KEY: dict(state),
        ARCHITECTURES_KEY: architecture_records({NETWORK_KEY: network}),
        "network_config": {
            "channels": list(network.channels),
            "depths": list(network.depths),
            "num_targets": network.num_targets,
        },
        **record,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def train_finding_classifier(
    dataset_dir: str,
    output: str,
    epochs: int = 60,
    batch_size: int = 32,
    seed: int = 0,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    channels: Sequence[int] = (16, 32, 64, 128),
    depths: Sequence[int] = (1, 1, 2, 2),
    augment: bool = True,
    patience: int | None = None,
    time_limit_s: float | None = None,
    train_limit: int | None = None,
    val_limit: int | None = None,
    num_threads: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the finding classifier on the 'training' split; keep the epoch with the best mean validation AUROC.

    Args:
        dataset_dir: chest X-ray phantom data set (``datalist.json`` with 'training' and 'validation' splits, and
            optionally 'test', whose entries carry ``facts``); square images with a side divisible by 16.
        output: weights file to write (atomically); an existing one is replaced only with ``overwrite``.
        epochs: passes over the training split.
        batch_size: images per step.
        seed: seeds initialization, shuffling and augmentation.
        lr: AdamW peak learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        channels: stage widths of the network; the last is the FID feature size ``D``.
        depths: convolution blocks per stage.
        augment: light affine / gamma / blur / noise augmentation of training images (never mirroring).
        patience: stop after this many epochs without a better validation result (default: never).
        time_limit_s: stop after the first epoch that ends past this many seconds (default: no limit).
        train_limit: keep only the first N training entries (quick runs, tests).
        val_limit: keep only the first N validation entries.
        num_threads: torch CPU threads (default: torch's choice).
        overwrite: replace an existing ``output``.

    Returns:
        ``{"validation_auroc", "test_auroc" (None without a test split), "epoch", "seconds", "output"}``.
    """
    path = check_output(output, overwrite)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    set_determinism(seed=seed)
    start = time.perf_counter()

    train_items = split_items(dataset_dir, "training", limit=train_limit)
    val_x, val_y = load_arrays(split_items(dataset_dir, "validation", limit=val_limit))
    if val_x.shape[2] != val_x.shape[3] or val_x.shape[2] % 16:
        raise ValueError(f"Images must be square with a side divisible by 16, got {tuple(val_x.shape[2:])}.")
    transform = Compose(load_transforms() + (augment_transforms() if augment else []))
    train_set = CacheDataset(train_items, transform=transform, progress=False)
    loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(seed)
    )
    print(f"{len(train_items)} training / {len(val_x)} validation images of size {tuple(val_x.shape[2:])} (1, W, H)")

    network = build_network(
        "PhantomFeatureNet", channels=list(channels), depths=list(depths), num_targets=len(FINDING_LABELS)
    )
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * len(loader)), pct_start=0.1
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()

    best: Evaluation | None = None
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(1, epochs + 1):
        train_loss = train_epoch(network, loader, optimizer, scheduler, loss_fn)
        result = evaluate(network, val_x, val_y, 2 * batch_size, epoch)
        print(
            f"epoch {epoch}: train loss {train_loss:.4f}, validation loss {result.loss:.4f}, "
            f"AUROC mean {mean_auroc(result.auroc):.3f} ({format_auroc(result.auroc)}) "
            f"[{time.perf_counter() - start:.0f} s]"
        )
        if best is None or result.rank > best.rank:
            best, best_state = result, copy.deepcopy(network.state_dict())
        if patience is not None and epoch - best.epoch >= patience:
            print(f"No better validation result for {patience} epochs: stopping.")
            break
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            print(f"Time limit of {time_limit_s:.0f} s reached after epoch {epoch}: stopping.")
            break

    network.load_state_dict(best_state)
    test_auroc = None
    if has_split(dataset_dir, "test"):
        test_x, test_y = load_arrays(split_items(dataset_dir, "test"))
        test_auroc = evaluate(network, test_x, test_y, 2 * batch_size, best.epoch).auroc
    seconds = time.perf_counter() - start
    record = {
        "targets": list(FINDING_LABELS),
        "outputs": "logits",
        "image_size": [int(s) for s in val_x.shape[2:]],
        "image_layout": IMAGE_LAYOUT,
        "validation_auroc": best.auroc,
        "test_auroc": test_auroc,
        "epoch": best.epoch,
        "seed": int(seed),
        PROVENANCE_KEY: {"demo": True, "trained_on": str(dataset_dir)},
    }
    save_classifier(path, network, best_state, record)
    size_kb = path.stat().st_size / 1024
    print(f"Best epoch {best.epoch}; saved {path} ({size_kb:.0f} KiB) after {seconds:.0f} s")
    print(f"Validation AUROC (n={len(val_x)}): {format_auroc(best.auroc)}")
    if test_auroc is not None:
        print(f"Test AUROC (n={len(test_x)}): {format_auroc(test_auroc)}")
    return {
        "validation_auroc": best.auroc,
        "test_auroc": test_auroc,
        "epoch": best.epoch,
        "seconds": round(seconds, 1),
        "output": str(path),
    }


def cli() -> None:
    """Entry point of ``train-finding-classifier``; bad arguments end with status 2 and the reason."""
    try:
        fire.Fire(train_finding_classifier, name="train_finding_classifier", serialize=lambda _: None)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"train_finding_classifier: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
