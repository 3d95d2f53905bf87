"""Feature networks for FID: images ``(N, 1, H, W)`` in [0, 1] -> features ``(N, D)``.

Two kinds, chosen by name with :func:`build_feature_extractor`:

- ``"phantom"``: :class:`PhantomFeatureNet`, a small CNN the project trains on phantom data to regress
  the known facts of phantom images (``train-feature-network``); its global-average-pooled embedding
  (``D = 64``) is the FID feature. Works offline, for the demo and for tests.
- ``"radimagenet_resnet50"``: the RadImageNet ResNet50 that MONAI's ``PerceptualLoss`` uses, loaded with
  ``torch.hub`` from a local hub directory only (never downloaded at run time); spatially averaged
  ``layer4`` features, ``D = 2048``.

Every extractor is an ``nn.Module`` in eval mode that runs without gradients, processes its input in
batches on its own device and returns float32 features on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks import Convolution
from torch import nn

from common.io.weights import load_weights

#: Names accepted by :func:`build_feature_extractor`.
FEATURE_EXTRACTOR_KINDS = ("phantom", "radimagenet_resnet50", "xrv_densenet121")


PHANTOM_HOW_TO_GET = (
    "Train one on phantoms (a few CPU minutes) with `train-feature-network --dataset_dir DIR --output FILE`."
)

RADIMAGENET_REPO = "Project-MONAI/perceptual-models:main"
RADIMAGENET_REPO_DIR = "Project-MONAI_perceptual-models_main"
RADIMAGENET_FILE = "RadImageNet-ResNet50_notop.pth"
RADIMAGENET_HOW_TO_GET = (
    'On a machine with internet access run `python -c "from monai.losses import PerceptualLoss; '
    "PerceptualLoss(spatial_dims=2, network_type='radimagenet_resnet50', cache_dir='HUB_DIR')\"` (it fetches the "
    f"torch.hub repository {RADIMAGENET_REPO} into HUB_DIR/{RADIMAGENET_REPO_DIR} and the weights "
    f"HUB_DIR/{RADIMAGENET_FILE} from the Hugging Face repository MONAI/checkpoints), copy HUB_DIR here and pass it "
    "as the weights path."
)
#: Per-channel BGR means subtracted by MONAI's RadImageNet perceptual similarity (``monai.losses.perceptual``).
RADIMAGENET_BGR_MEAN = (0.406, 0.456, 0.485)


class PhantomFeatureNet(nn.Module):
    """Small 2D CNN whose pooled embedding serves as FID feature, trained to regress the facts of phantom images.

    Four stages of MONAI ``Convolution`` blocks (3x3 conv, batch norm, ReLU); the first block of each stage halves
    the resolution, the others keep it. Global average pooling follows, so any ``H, W`` divisible by 16 works
    (80 x 112 demo slices, 160 x 224 full-size slices). Sized for CPU training in minutes (~71k parameters, 0.3 MB).

    Args:
        channels: output channels of the four stages; the last is the feature size ``D``.
        depths: convolution blocks per stage.
        num_targets: ``K``, the number of regression outputs (standardized targets: the phantom facts named in the
            checkpoint's ``targets``, e.g. ``common.data.brain.phantoms.FEATURE_TARGETS``).
        in_channels: image channels (1 for a grayscale slice).
    """

    def __init__(
        self,
        channels: Sequence[int] = (8, 16, 32, 64),
        depths: Sequence[int] = (1, 1, 2, 2),
        num_targets: int = 6,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.depths = tuple(int(d) for d in depths)
        if len(self.channels) != 4 or len(self.depths) != 4 or min(self.depths) < 1:
            raise ValueError(f"Need 4 stages with >= 1 block each, got channels {channels} and depths {depths}.")
        self.num_targets = int(num_targets)
        blocks = []
        previous = in_channels
        for out, depth in zip(self.channels, self.depths, strict=True):
            for i in range(depth):
                blocks.append(
                    Convolution(
                        spatial_dims=2,
                        in_channels=previous,
                        out_channels=out,
                        strides=2 if i == 0 else 1,
                        kernel_size=3,
                        act="RELU",
                        norm="BATCH",
                    )
                )
                previous = out
        self.encoder = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(previous, self.num_targets)

    @property
    def feature_dim(self) -> int:
        """``D``, the size of :meth:`features`."""
        return self.channels[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding ``(B, D)`` of images ``x`` ``(B, 1, H, W)`` in [0, 1] (``H``, ``W`` divisible by 16)."""
        if x.ndim != 4 or any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"PhantomFeatureNet expects (B, C, H, W) with H, W divisible by 16, got {tuple(x.shape)}.")
        return self.pool(self.encoder(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized target predictions ``(B, K)`` for images ``x`` ``(B, 1, H, W)``."""
        return self.head(self.features(x))


class FeatureExtractor(nn.Module):
    """Callable ``images (N, 1, H, W) -> features (N, D)``: eval mode, no gradients, batched, CPU float32 output.

    Args:
        embed: module mapping a preprocessed batch ``(B, C, H, W)`` to ``(B, D)``.
        feature_dim: ``D``.
        batch_size: images per forward pass.
        preprocess: optional function applied to each batch ``(B, 1, H, W)`` in [0, 1] before ``embed``.
    """

    def __init__(
        self,
        embed: nn.Module,
        feature_dim: int,
        batch_size: int = 64,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.feature_dim = int(feature_dim)
        self.batch_size = int(batch_size)
        self.preprocess = preprocess
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode: a feature network for a metric must not update batch-norm statistics."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(N, D)`` (CPU, float32) of ``images`` ``(N, 1, H, W)`` in [0, 1]."""
        if images.ndim != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(images.shape)}.")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = torch.as_tensor(images[start : start + self.batch_size]).as_subclass(torch.Tensor)
            batch = batch.to(self.device, torch.float32)
            if self.preprocess is not None:
                batch = self.preprocess(batch)
            out.append(self.embed(batch).float().cpu())
        if not out:
            return torch.empty(0, self.feature_dim)
        return torch.cat(out)


class _PooledFeatures(nn.Module):
    """``network.features`` of a :class:`PhantomFeatureNet` as a module's forward."""

    def __init__(self, network: PhantomFeatureNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.features(x)


class _SpatialAverage(nn.Module):
    """``network(x)`` ``(B, C, h, w)`` averaged over space -> ``(B, C)``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).mean(dim=(2, 3))


def phantom_feature_extractor(network: PhantomFeatureNet, batch_size: int = 64) -> FeatureExtractor:
    """:class:`FeatureExtractor` of the pooled embedding ``(N, D)`` of ``network`` (trained or freshly initialized)."""
    return FeatureExtractor(_PooledFeatures(network), network.feature_dim, batch_size=batch_size)


def radimagenet_preprocess(images: torch.Tensor) -> torch.Tensor:
    """As MONAI's RadImageNet perceptual similarity: 1 -> 3 channels, RGB -> BGR, subtract the channel means."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    images = images[:, [2, 1, 0]]
    mean = torch.tensor(RADIMAGENET_BGR_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images - mean


def load_phantom_feature_net(
    weights_path: str | Path, how_to_get: str = PHANTOM_HOW_TO_GET
) -> tuple[PhantomFeatureNet, dict[str, Any]]:
    """A :class:`PhantomFeatureNet` (eval mode) from a ``tools/train_feature_network.py`` checkpoint, and the checkpoint.

    Raises:
        FileNotFoundError: no file at ``weights_path``; the message says how to train one.
        ValueError: the file is not such a checkpoint.
    """
    state = load_weights(weights_path, how_to_get=how_to_get)
    if "feature_network" not in state:
        raise ValueError(
            f"{weights_path} holds {sorted(state)}, not a phantom feature network checkpoint "
            f"(entry 'feature_network'). {how_to_get}"
        )
    config = state.get("network_config", {})
    network = PhantomFeatureNet(
        channels=config.get("channels", (8, 16, 32, 64)),
        depths=config.get("depths", (1, 1, 2, 2)),
        num_targets=config.get("num_targets", len(state["targets"])),
    )
    network.load_state_dict(state["feature_network"])
    return network.eval(), state


def load_radimagenet_resnet50(hub_dir: str | Path | None = None) -> nn.Module:
    """RadImageNet ResNet50 (``(B, 3, H, W)`` -> ``layer4`` maps ``(B, 2048, h, w)``) from a local torch.hub directory.

    ``hub_dir`` must hold the hub repository ``Project-MONAI_perceptual-models_main/`` and the weights
    ``RadImageNet-ResNet50_notop.pth``, the layout MONAI's ``PerceptualLoss(..., cache_dir=hub_dir)`` leaves
    behind; ``None`` looks in ``torch.hub.get_dir()``. Nothing is downloaded.

    Raises:
        FileNotFoundError: either part is missing; the message says what to fetch and how.
    """
    hub_dir = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    repo_dir = hub_dir / RADIMAGENET_REPO_DIR
    weights = hub_dir / RADIMAGENET_FILE
    missing = [str(p) for p in (repo_dir / "hubconf.py", weights) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"RadImageNet ResNet50 is not in the local torch.hub directory {hub_dir} (missing: {', '.join(missing)}); "
            f"it is never downloaded at run time. {RADIMAGENET_HOW_TO_GET}"
        )
    try:
        # source="local" imports hubconf.py from repo_dir; with the weights already in cache_dir its entry point
        # loads them from disk and downloads nothing.
        return torch.hub.load(
            str(repo_dir), "radimagenet_resnet50", source="local", cache_dir=str(hub_dir), verbose=False
        )
    except ImportError as err:
        raise ImportError(
            f"The torch.hub code in {repo_dir} needs a package that is not installed ({err}); "
            "install `huggingface_hub` (it is only imported, nothing is fetched)."
        ) from err


def build_feature_extractor(
    kind: str,
    weights_path: str | Path | None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    how_to_get: str = PHANTOM_HOW_TO_GET,
) -> FeatureExtractor:
    """The FID feature extractor ``kind``: a callable ``images (N, 1, H, W) in [0, 1] -> features (N, D)``.

    Args:
        kind: ``"phantom"`` (``weights_path``: a checkpoint of ``tools/train_feature_network.py``, ``D = 64``) or
            ``"radimagenet_resnet50"`` (``weights_path``: a local torch.hub directory, see
            :func:`load_radimagenet_resnet50`; ``None`` means ``torch.hub.get_dir()``; ``D = 2048``) or
            ``"xrv_densenet121"`` (chest X-rays: torchxrayvision's ``densenet121-res224-all`` weights file, see
            :mod:`common.networks.xrv_features`; ``D = 1024``).
        weights_path: where the weights are; never downloaded.
        device: where the network runs; the features come back on the CPU.
        batch_size: images per forward pass.
        how_to_get: what the error for missing ``"phantom"`` weights says to do (the bundle's own command).

    Raises:
        ValueError: unknown ``kind``, or ``"phantom"`` without ``weights_path``.
        FileNotFoundError: the weights are missing; the message says how to get them.
    """
    if kind == "phantom":
        if weights_path is None:
            raise ValueError(f"The 'phantom' feature extractor needs weights_path. {how_to_get}")
        network, _ = load_phantom_feature_net(weights_path, how_to_get)
        extractor = phantom_feature_extractor(network, batch_size=batch_size)
    elif kind == "xrv_densenet121":
        from common.networks.xrv_features import XRV_HOW_TO_GET, xrv_feature_extractor  # it imports this module

        if weights_path is None:
            raise ValueError(f"The 'xrv_densenet121' feature extractor needs weights_path. {XRV_HOW_TO_GET}")
        extractor = xrv_feature_extractor(weights_path, batch_size=batch_size)
    elif kind == "radimagenet_resnet50":
        network = load_radimagenet_resnet50(weights_path)
        extractor = FeatureExtractor(
            _SpatialAverage(network), 2048, batch_size=batch_size, preprocess=radimagenet_preprocess
        )
    else:
        raise ValueError(
            f"Unknown feature extractor kind {kind!r}; choose one of {', '.join(FEATURE_EXTRACTOR_KINDS)}."
        )
    return extractor.to(device)
