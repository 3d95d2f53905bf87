"""Training losses: patch adversarial losses for engines, and the optional local perceptual loss."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
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


class GeneratorAdversarialLoss(torch.nn.Module):
    """Generator side of a patch adversarial loss: fake logits -> loss for "judged real"."""

    def __init__(self, criterion: str = "least_squares") -> None:
        super().__init__()
        from monai.losses import PatchAdversarialLoss

        self.loss = PatchAdversarialLoss(criterion=criterion)

    def forward(self, fake_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.loss(_last(fake_logits), target_is_real=True, for_discriminator=False)


class DiscriminatorAdversarialLoss(torch.nn.Module):
    """Discriminator side of a patch adversarial loss: mean of real-as-real and fake-as-fake losses."""

    def __init__(self, criterion: str = "least_squares") -> None:
        super().__init__()
        from monai.losses import PatchAdversarialLoss

        self.loss = PatchAdversarialLoss(criterion=criterion)

    def forward(self, real_logits: Any, fake_logits: Any) -> torch.Tensor:
        real = self.loss(_last(real_logits), target_is_real=True, for_discriminator=True)
        fake = self.loss(_last(fake_logits), target_is_real=False, for_discriminator=True)
        return 0.5 * (real + fake)


def _last(logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    # PatchDiscriminator returns every intermediate feature map; the last one holds the logits.
    return logits[-1] if isinstance(logits, list | tuple) else logits
