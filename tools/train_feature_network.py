"""Train the phantom feature network: the FID backbone of the demo (``common.feature_extractors``, kind ``"phantom"``).

No pretrained feature network can be downloaded offline, so the project trains its own: a small CNN
(``PhantomFeatureNet``) regresses standardized brain-morphology targets (age, ventricle volume, GM / WM / CSF
fractions, WMH volume) from T1w slices of a phantom data set; its pooled 64-d embedding is the FID feature.
Validation R^2 per target is reported after every epoch and the best epoch (highest mean validation R^2) is kept.

Output (written atomically, loadable with ``common.io.weights.load_weights``)::

    {"feature_network": state_dict, "architectures": {"feature_network": {"network": "PhantomFeatureNet", ...}},
     "provenance": {"demo": true, ...},
     "network_config": {"channels": [...], "depths": [...], "num_targets": K},
     "targets": [...], "target_mean": [...], "target_std": [...], "validation_r2": {target: R^2},
     "epoch": best epoch, "seed": seed, "image_size": [H, W]}

Usage (from the repository root)::

    python tools/train_feature_network.py --dataset_dir data/brain_phantoms_demo \\
        --output bundles/brain_t1_ldm/models/feature_network.pt [--epochs 80] [--batch_size 32] [--seed 0]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import fire
import torch
from monai.transforms import LoadImage
from monai.utils import set_determinism
from tqdm import tqdm

from common.data.brain.phantoms import FEATURE_TARGETS
from common.data.datalists import load_datalist
from common.io.atomic import atomic_path
from common.io.provenance import PROVENANCE_KEY
from common.networks.architecture import ARCHITECTURES_KEY, architecture_records, build_network
from common.networks.feature_extractors import PhantomFeatureNet

DEFAULT_OUTPUT = "bundles/brain_t1_ldm/models/feature_network.pt"


def load_split(dataset_dir: str, key: str, targets: tuple[str, ...], limit: int | None = None):
    """Images ``(N, 1, H, W)`` float32 and raw targets ``(N, K)`` float32 of split ``key``."""
    entries = load_datalist(dataset_dir, key, limit=limit)
    missing = [t for t in targets if t not in entries[0]]
    if missing:
        raise ValueError(
            f"The '{key}' entries of {dataset_dir} lack the targets {missing}; phantom data sets have them."
        )
    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype="float32")
    images = torch.stack([torch.as_tensor(loader(e["image"])).as_subclass(torch.Tensor) for e in entries])
    values = torch.tensor([[float(e[t]) for t in targets] for e in entries], dtype=torch.float32)
    return images, values


def r2_scores(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per column of ``(N, K)`` predictions."""
    residual = ((target - pred) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return 1.0 - residual / total


@torch.no_grad()
def predict(network: PhantomFeatureNet, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    network.eval()
    return torch.cat([network(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def train_feature_network(
    dataset_dir: str = "data/brain_phantoms_demo",
    output: str = DEFAULT_OUTPUT,
    epochs: int = 80,
    batch_size: int = 32,
    seed: int = 0,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    channels: tuple[int, ...] = (8, 16, 32, 64),
    depths: tuple[int, ...] = (1, 1, 2, 2),
    max_shift: int = 4,
    patience: int | None = None,
    time_limit_s: float | None = None,
    train_limit: int | None = None,
    val_limit: int | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Train ``PhantomFeatureNet`` on the 'training' split, keep the epoch with the best mean validation R^2.

    Args:
        dataset_dir: phantom data set with ``datalist.json`` ('training' and 'validation' splits whose entries
            carry the targets ``age``, ``ventricle_volume_ml``, ``gm_fraction``, ``wm_fraction``, ``csf_fraction``,
            ``wmh_volume_ml``).
        output: checkpoint path (written atomically).
        epochs: passes over the training split.
        batch_size: images per step.
        seed: seeds initialization, shuffling and augmentation (deterministic algorithms on).
        lr: AdamW peak learning rate (cosine decay to 0).
        weight_decay: AdamW weight decay.
        channels: stage widths of the network; the last is the feature size.
        depths: convolution blocks per stage.
        max_shift: augmentation: random translation of each training image by up to this many pixels per axis
            (the background is black, so a circular shift is a translation); 0 turns it off.
        patience: stop early after this many epochs without a better mean validation R^2 (default: never).
        time_limit_s: stop after the first epoch that ends past this many seconds (the result then depends on the
            machine's speed; default: no limit).
        train_limit: keep only the first N training entries (quick runs, tests).
        val_limit: keep only the first N validation entries.
        num_threads: torch CPU threads (default: torch's choice).

    Returns:
        ``{"validation_r2": {target: R^2}, "epoch": best epoch, "seconds": training time, "output": path}``.
    """
    if num_threads:
        torch.set_num_threads(int(num_threads))
    set_determinism(seed=seed)
    torch.use_deterministic_algorithms(True)
    targets = FEATURE_TARGETS
    start = time.perf_counter()
    train_x, train_y = load_split(dataset_dir, "training", targets, limit=train_limit)
    val_x, val_y = load_split(dataset_dir, "validation", targets, limit=val_limit)
    if any(s % 16 for s in train_x.shape[2:]):
        raise ValueError(f"Image size {tuple(train_x.shape[2:])} is not divisible by 16.")
    mean, std = train_y.mean(0), train_y.std(0).clamp_min(1e-6)
    train_z, val_z = (train_y - mean) / std, (val_y - mean) / std
    print(f"{len(train_x)} training / {len(val_x)} validation images of size {tuple(train_x.shape[2:])}")

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    network = build_network(
        "PhantomFeatureNet", channels=list(channels), depths=list(depths), num_targets=len(targets)
    )  # same construction, and so the same seeded initial weights, as PhantomFeatureNet(...)
    steps_per_epoch = -(-len(train_x) // batch_size)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.1
    )
    loss_fn = torch.nn.MSELoss()

    best: dict[str, Any] = {"score": -float("inf"), "epoch": 0, "r2": None, "state": None}
    for epoch in range(1, epochs + 1):
        network.train()
        order = torch.randperm(len(train_x), generator=generator)
        flips = torch.rand(len(train_x), generator=generator) < 0.5
        shifts = torch.randint(-max_shift, max_shift + 1, (len(train_x), 2), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stdout)
        total = 0.0
        for step in bar:
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = train_x[idx]
            # Left-right mirroring (first spatial axis of these slices) changes none of the targets.
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(2), x)
            if max_shift:
                x = torch.stack(
                    [img.roll(tuple(shifts[i].tolist()), dims=(1, 2)) for img, i in zip(x, idx, strict=True)]
                )
            loss = loss_fn(network(x), train_z[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = loss.detach().item()
            total += value * len(idx)
            bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        r2 = r2_scores(predict(network, val_x, 2 * batch_size), val_z)
        score = float(r2.mean())
        report = " ".join(f"{t}={float(v):.3f}" for t, v in zip(targets, r2, strict=True))
        print(f"epoch {epoch}: train loss {total / len(train_x):.4f}, validation R^2 mean {score:.3f} ({report})")
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "r2": r2, "state": copy.deepcopy(network.state_dict())}
        if patience is not None and epoch - best["epoch"] >= patience:
            print(f"No better validation R^2 for {patience} epochs: stopping.")
            break
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            print(f"Time limit of {time_limit_s:.0f} s reached after epoch {epoch}: stopping.")
            break

    seconds = time.perf_counter() - start
    validation_r2 = {t: round(float(v), 4) for t, v in zip(targets, best["r2"], strict=True)}
    checkpoint = {
        "feature_network": best["state"],
        ARCHITECTURES_KEY: architecture_records({"feature_network": network}),
        PROVENANCE_KEY: {"demo": True, "trained_on": f"phantoms ({dataset_dir}); not for research"},
        "network_config": {
            "channels": [int(c) for c in channels],
            "depths": [int(d) for d in depths],
            "num_targets": len(targets),
        },
        "targets": list(targets),
        "target_mean": [float(v) for v in mean],
        "target_std": [float(v) for v in std],
        "validation_r2": validation_r2,
        "epoch": best["epoch"],
        "seed": seed,
        "image_size": [int(s) for s in train_x.shape[2:]],
    }
    with atomic_path(output) as tmp:
        torch.save(checkpoint, tmp)
    size_kb = Path(output).stat().st_size / 1024
    print(f"Best epoch {best['epoch']} (mean validation R^2 {best['score']:.3f}); saved {output} ({size_kb:.0f} KiB)")
    print(f"Validation R^2: {validation_r2}; {seconds:.0f} s")
    return {"validation_r2": validation_r2, "epoch": best["epoch"], "seconds": round(seconds, 1), "output": output}


def cli() -> None:
    """Entry point of ``train-feature-network``."""
    fire.Fire(train_feature_network)


if __name__ == "__main__":
    cli()
