"""Ignite handlers: scale-factor fitting, sample images in TensorBoard, weight export, stop on NaN."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from common.diffusion.latent_space import ScaledLatentSpace
from common.diffusion.sampling import GuidedLatentSampler
from common.io.display import check_orientation, to_display
from common.io.provenance import PROVENANCE_KEY
from common.networks.architecture import ARCHITECTURES_KEY, architecture_records
from common.networks.text_encoder import CLIPPromptEncoder

if TYPE_CHECKING:  # peft loads only where adapters are exported
    from common.networks.lora import LoRASettings

logger = logging.getLogger(__name__)


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


class EmbeddingStandardizerHandler:
    """Fit the prior's embedding standardiser on the training image embeddings when training starts.

    A standardiser already fitted (restored from a checkpoint: attach this after the ``SafeCheckpointLoader``) is
    kept, so a resumed run diffuses the same standardised embeddings. Every rank fits on the whole training set
    (``items``, the cached datalist), so the statistics agree without communication.

    Args:
        standardizer: the prior's ``EmbeddingStandardizer``.
        items: the training items, each with ``embedding_key`` ``(D,)`` (``ClipImageEmbeddingCache`` output).
        embedding_key: item key of the image embedding.
    """

    def __init__(
        self, standardizer: torch.nn.Module, items: Sequence[Mapping[str, Any]], embedding_key: str = "image_embedding"
    ) -> None:
        self.standardizer = standardizer
        self.items = items
        self.embedding_key = embedding_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if bool(self.standardizer.fitted):
            logger.info("Embedding standardiser kept (resumed)")
            return
        if any(self.embedding_key not in item for item in self.items):
            raise KeyError(f"Training items lack '{self.embedding_key}': cache the CLIP image embeddings first.")
        embeddings = torch.stack([torch.as_tensor(item[self.embedding_key]).float() for item in self.items])
        self.standardizer.fit(embeddings)
        logger.info("Embedding standardiser fitted on %d training image embeddings", embeddings.shape[0])


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
        display_orientation: how images are turned for display (``common.io.display``).
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
        display_orientation: str = "array",
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
        self.display_orientation = check_orientation(display_orientation)
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
        grid = to_display(images.clamp(0, 1), self.display_orientation).cpu()
        self._writer.add_images(self.tag, grid, global_step=engine.state.epoch)
        self._writer.flush()


class WeightsExporter:
    """When training completes (not when it fails), save ``{name: obj.state_dict()}`` to ``path`` on rank 0.

    This is the file inference loads: network weights plus what must travel with them (latent scale
    factor, noise schedule, and the architecture of each network built with
    ``common.networks.architecture.build_network``, under ``"architectures"``). ``provenance`` (e.g.
    ``{"demo": True}`` for weights trained on phantoms) is saved under ``"provenance"`` and reported in the
    sidecar of every output they make.

    ``path`` belongs to the run (``run_dir``): training never replaces a bundle's weights by accident. Only an
    explicit ``install_path`` (the configs' ``--install_weights True``) also writes the weights there, and the log
    says what was replaced. Every file is written to a temporary name and renamed, so an interrupted export never
    leaves a truncated weights file.
    """

    def __init__(
        self,
        path: str,
        objects: dict[str, object],
        provenance: Mapping[str, Any] | None = None,
        install_path: str | None = None,
    ) -> None:
        self.path = path
        self.objects = objects
        self.provenance = dict(provenance or {})
        self.install_path = install_path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if idist.get_rank() != 0:
            return
        from common.io.atomic import atomic_path
        from common.io.weights import sha256sum

        names = self.save()
        if self.install_path is None:
            logger.info(
                "Exported %s to %s. The bundle's weights are unchanged: to use these, pass their path to the next "
                "stage or to inference, or rerun with --install_weights True to install them.",
                names,
                self.path,
            )
            return
        install = Path(self.install_path)
        replaced = f"replaced {install} (sha256 {sha256sum(install)[:12]})" if install.is_file() else f"wrote {install}"
        with atomic_path(install) as tmp:
            shutil.copyfile(self.path, tmp)  # the file just written, byte for byte, not a second serialisation
        logger.warning("Exported %s to %s and installed them (--install_weights True): %s.", names, self.path, replaced)

    def save(self) -> str:
        """Write the exported file to ``path`` (atomically); return what it holds, for the log."""
        from common.io.atomic import atomic_path

        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        if records := architecture_records(self.objects):
            state[ARCHITECTURES_KEY] = records
        if self.provenance:
            state[PROVENANCE_KEY] = self.provenance
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        return ", ".join(self.objects)


class LoRAAdapterExporter(WeightsExporter):
    """When training completes, save only the LoRA adapters of ``network`` (``common.networks.lora.save_lora``:
    the adapter tensors, their rank, alpha and targets, and the base network's fingerprint) to ``path``; install
    them at ``install_path`` when given, as :class:`WeightsExporter` does.
    """

    def __init__(
        self,
        path: str,
        network: torch.nn.Module,
        settings: LoRASettings,
        provenance: Mapping[str, Any] | None = None,
        install_path: str | None = None,
    ) -> None:
        super().__init__(path, {}, provenance, install_path)
        self.network = network
        self.settings = settings

    def save(self) -> str:
        from common.networks.lora import save_lora

        save_lora(self.path, self.network, self.settings, provenance=self.provenance)
        return f"the LoRA adapters (rank {self.settings.rank}, {len(self.settings.target_modules)} layers)"


class TerminateOnNaNHandler:
    """Ignite's ``TerminateOnNan`` with the ``attach`` that MONAI handler lists expect."""

    def __init__(self, output_transform=lambda output: output) -> None:
        from ignite.handlers import TerminateOnNan

        self.handler = TerminateOnNan(output_transform=output_transform)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.handler)
