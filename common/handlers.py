"""Ignite handlers: safe resume from checkpoints, scale-factor fitting, sample images in TensorBoard, weight export."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.networks.utils import copy_model_state
from torch.utils.tensorboard import SummaryWriter

from common.checkpoints import load_weights
from common.latent import ScaledLatentSpace
from common.sampling import GuidedLatentSampler
from common.text.encoder import CLIPPromptEncoder

logger = logging.getLogger(__name__)


class SafeCheckpointLoader:
    """Drop-in for ``monai.handlers.CheckpointLoader`` that reads the file through ``common.checkpoints.load_weights``.

    Same arguments and behaviour as MONAI's loader (load when the engine starts, restore every object of
    ``load_dict`` with ignite's ``Checkpoint.load_objects``, keep the engine's ``max_epochs``), plus an
    optional ``sha256`` of the checkpoint. Loading is ``weights_only=True``; a truncated, foreign or
    tampered file, or a checkpoint lacking an object of ``load_dict``, fails with an error naming the file.
    Restoring the trainer's state makes a resumed run continue at the epoch after the checkpoint's.

    Args:
        load_path: the checkpoint file (e.g. ``checkpoint_epoch=7.pt`` written by ``CheckpointSaver``).
        load_dict: ``{name: object}`` to restore (networks, optimizers, the trainer, objects with a state dict).
        name: logger name; ``None`` logs through the engine's logger.
        map_location: where tensors are loaded (device, string or mapping, as for ``torch.load``).
        strict: strict ``load_state_dict`` for networks.
        strict_shape: ``False`` skips network layers whose shape differs and loads only the networks (as MONAI).
        sha256: expected hex digest of the file, checked before loading when given.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: Mapping[str, Any],
        name: str | None = None,
        map_location: str | torch.device | Mapping | None = None,
        strict: bool = True,
        strict_shape: bool = True,
        sha256: str | None = None,
    ) -> None:
        if load_path is None:
            raise ValueError(
                "SafeCheckpointLoader: `load_path` is None; disable the handler when there is nothing to resume."
            )
        if not load_dict:
            raise ValueError("SafeCheckpointLoader: `load_dict` is empty; give the objects to restore.")
        if strict and not strict_shape:
            warnings.warn("as `strict_shape` is False, `strict` is set to False.", stacklevel=2)
            strict = False
        self.load_path = str(load_path)
        self.load_dict = dict(load_dict)
        self._name = name
        self.logger = logging.getLogger(name)
        self.map_location = map_location
        self.strict = strict
        self.strict_shape = strict_shape
        self.sha256 = sha256

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def _checkpoint(self) -> dict[str, Any]:
        checkpoint = load_weights(self.load_path, sha256=self.sha256, map_location=self.map_location or "cpu")
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and first not in checkpoint:
            return {first: checkpoint}  # a bare state dict for a single object
        missing = [key for key in self.load_dict if key not in checkpoint]
        if missing:
            raise KeyError(
                f"Checkpoint {self.load_path} has no {missing} (it holds {sorted(checkpoint)}): it was written by "
                "another config; resume from a checkpoint of this run or start afresh with --resume false."
            )
        return checkpoint

    def __call__(self, engine: Engine) -> None:
        checkpoint = self._checkpoint()
        to_load = dict(self.load_dict)
        if not self.strict_shape:
            for key, obj in self.load_dict.items():
                if isinstance(obj, torch.nn.Module):
                    checkpoint[key] = copy_model_state(obj, checkpoint[key], inplace=False)[0]
                else:
                    warnings.warn(
                        f"`strict_shape` is False: '{key}' is not a network and is not restored.", stacklevel=2
                    )
                    to_load.pop(key)
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"Checkpoint {self.load_path} is at epoch {engine.state.epoch}, beyond this run's max_epochs "
                f"({prior_max_epochs}): raise max_epochs to train further, or start afresh with --resume false."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


class LatentScaleFactorHandler:
    """Fit ``1 / std`` of training latents when training starts, unless the scale factor is already known.

    Attach it after the ``SafeCheckpointLoader``: a resumed run keeps the scale factor it was trained with.
    """

    def __init__(self, latent_space: ScaledLatentSpace, image_key: str = "image", max_batches: int = 20) -> None:
        self.latent_space = latent_space
        self.image_key = image_key
        self.max_batches = max_batches

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self.latent_space.scale_factor is not None:
            logger.info("Latent scale factor: %.5f (given or resumed)", self.latent_space.scale_factor)
            return
        self.latent_space.fit_scale_factor(engine.data_loader, self.image_key, engine.state.device, self.max_batches)


class SampleImagesHandler:
    """Every ``interval`` epochs, sample fixed-seed images for ``prompts`` and log them to TensorBoard.

    Fixed noise across epochs makes the images comparable as training goes on. Runs on rank 0 only.

    Args:
        sampler: the guided sampler (its knobs decide steps and guidance).
        network: the diffusion UNet being trained.
        prompt_encoder: the frozen text encoder.
        prompts: one image is drawn per prompt.
        latent_shape: ``(c, h, w)`` of a latent.
        log_dir: TensorBoard folder.
    """

    def __init__(
        self,
        sampler: GuidedLatentSampler,
        network: torch.nn.Module,
        prompt_encoder: CLIPPromptEncoder,
        prompts: Sequence[str],
        latent_shape: Sequence[int],
        log_dir: str,
        interval: int = 1,
        seed: int = 0,
        tag: str = "samples",
    ) -> None:
        self.sampler = sampler
        self.network = network
        self.prompt_encoder = prompt_encoder
        self.prompts = list(prompts)
        self.latent_shape = tuple(latent_shape)
        self.log_dir = log_dir
        self.interval = interval
        self.seed = seed
        self.tag = tag
        self._writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def close(self, _: Engine | None = None) -> None:
        if self._writer is not None:
            self._writer.close()

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        device = engine.state.device
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((len(self.prompts), *self.latent_shape), generator=generator).to(device)
        context = self.prompt_encoder(self.prompts).to(device)
        uncond = self.prompt_encoder([""] * len(self.prompts)).to(device)
        was_training = self.network.training
        images = self.sampler(noise, self.network, context=context, uncond_context=uncond)
        self.network.train(was_training)
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        # (B, 1, H, W) -> display orientation (rows = anterior-posterior) for TensorBoard.
        grid = images.clamp(0, 1).transpose(-1, -2).flip(-2).cpu()
        self._writer.add_images(self.tag, grid, global_step=engine.state.epoch)
        self._writer.flush()


class WeightsExporter:
    """When training completes (not when it fails), save ``{name: obj.state_dict()}`` to ``path`` on rank 0.

    This is the file inference loads: network weights plus what must travel with them (latent scale
    factor, noise schedule). It is written to a temporary name and renamed, so an interrupted export
    never leaves a truncated weights file in ``models/``.
    """

    def __init__(self, path: str, objects: dict[str, object]) -> None:
        self.path = path
        self.objects = objects

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if idist.get_rank() != 0:
            return
        from common.io import atomic_path

        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        logger.info("Exported %s to %s", ", ".join(self.objects), self.path)


class TerminateOnNaNHandler:
    """Ignite's ``TerminateOnNan`` with the ``attach`` that MONAI handler lists expect."""

    def __init__(self, output_transform=lambda output: output) -> None:
        from ignite.handlers import TerminateOnNan

        self.handler = TerminateOnNan(output_transform=output_transform)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.handler)
