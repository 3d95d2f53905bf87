"""Optional perceptual loss: used only when its backbone weights are already on disk."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.losses import PerceptualLoss

logger = logging.getLogger(__name__)

# torch.hub folder that MONAI's RadImageNet / MedicalNet perceptual backbones load from.
HUB_REPO_DIR = "Project-MONAI_perceptual-models_main"


def build_perceptual_loss(network_type: str = "radimagenet_resnet50", cache_dir: str | None = None):
    """``PerceptualLoss`` whose backbone is loaded from the local torch-hub ``cache_dir``, or ``None``.

    Nothing is downloaded: without local weights the loss is off and the log says what to fetch, so
    training runs on machines with no network (the reference recipes weight it 0.002 only).
    """
    if cache_dir is None or not (Path(cache_dir) / HUB_REPO_DIR).is_dir():
        logger.warning(
            "Perceptual loss OFF: no local weights for '%s' (perceptual_cache_dir=%s). To enable it, on a machine "
            "with network run `python -c \"import torch; torch.hub.load('Project-MONAI/perceptual-models:main', "
            "'%s', trust_repo=True)\"` with TORCH_HOME set, copy the hub folder, and pass --perceptual_cache_dir.",
            network_type,
            cache_dir,
            network_type,
        )
        return None
    logger.info("Perceptual loss ON: %s from %s", network_type, cache_dir)
    return PerceptualLoss(spatial_dims=2, network_type=network_type, cache_dir=cache_dir)
