"""Training benchmark: the bundle's diffusion training iteration against the seed-style step, on the same batches.

Candidates (each a call ``() -> None`` that makes one pass over the same prepared batches, ``iterations`` of them):

* ``bundle_cached_latents`` and ``bundle_encoding``: a real MONAI ``SupervisedTrainer`` built from the bundle's
  training configs (``train_autoencoder.json`` + ``train_diffusion.json``): its ``prepare_batch``
  (``LatentDiffusionPrepareBatch``: latents, noise, timesteps, v-prediction target, cached prompt embeddings), its
  ``train#inferer`` (``DiffusionInferer``), loss function, optimiser and ``amp`` setting. Only the data loader (the
  prepared batches) and the handlers (logging, validation, checkpoints) are replaced. ``bundle_encoding`` gets
  images and encodes them with the frozen autoencoder at every step; ``bundle_cached_latents`` (where the checkout
  has the latent cache, ``common.diffusion.latent_cache``) gets the posterior moments the cache stores, computed
  once before timing, and draws latents from them. Which one the bundle's config uses is ``cache_latents``.
* ``bundle_cached_latents_bf16`` (where the config has ``precision``): the same with ``--precision bf16``, the
  network's forward passes under bf16 autocast (``common.engines.precision.AutocastInferer``).
* ``seed_style`` (the baseline): the source article's training step (``train_epoch_ldm`` of its public code): timesteps, encode
  with the frozen autoencoder, run the text encoder on the tokenised prompts, noise, ``add_noise``, UNet,
  v-prediction target, MSE, backward, ``AdamW`` step. As there, the text encoder is not frozen (only left out of
  the optimiser), so backward also runs through it. Its CUDA autocast and grad scaler are off on a CPU. Prompts
  are tokenised beforehand, as its data loader does. Its UNet has MONAI's default attention (einsums), as the
  article's code builds it; the bundle's trainers run attention through SDPA (``common.networks.attention``).
* ``bundle_cached_latents_bf16_data_loader`` (with ``dataset_size``): the bf16 trainer reading its batches from the
  config's own ``train#dataloader``: random slices written as NIfTI files, encoded once by the config's
  ``latent_cache`` (untimed), served by its ``CacheDataset`` with its ``train#preprocessing`` (prompt dropout). What
  a training epoch costs per image, data loading included; the others feed prepared batches. A data set's size
  matters here: the cache once handed out views of one (N, ...) tensor, which ``CacheDataset`` deep-copies whole
  for every item it serves.
* ``encode_only`` (not a training step): the frozen autoencoder's encoding of the same batches, which both steps
  do every iteration; its ratio to ``seed_style`` is the share of a step that cached latents would remove.

Each training candidate trains its own copy of the same initial UNet. Images are random, in [0, 1], at the bundle's image
size (the cost of a step does not depend on their content); captions follow the phantom data set's template,
10 % empty as with prompt dropout.
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer

from common.networks.tokenizer import tokenize_prompts
from tools.benchmarks.sampling import monai_default_attention
from tools.benchmarks.timing import markdown_table, run_interleaved, summarize

BASELINE = "seed_style"

#: Fraction of captions emptied, as ``prompt_dropout`` of ``train_diffusion.json``.
EMPTY_PROMPT_FRACTION = 0.1


@dataclass
class TrainingSetup:
    """What both candidates share.

    Attributes:
        network: the initial UNet (each candidate trains a deep copy).
        prepare_batch: the bundle's ``LatentDiffusionPrepareBatch`` (its latent space and prompt encoder, and its
            DDPM scheduler, are the seed-style step's too).
        inferer, loss_function, amp: the bundle trainer's.
        optimizer: builds the bundle's optimiser for given parameters (``AdamW`` with the config's learning rate).
        batches: ``{"image" (B, 1, H, W), "caption" (B strings), "input_ids" (B, 77)}`` each.
        extra: settings of the bundle's config worth reporting (``cache_latents``).
        data_loader: the config's ``train#dataloader`` over a data set of cached latent moments, or ``None``.
    """

    network: torch.nn.Module
    prepare_batch: Any
    inferer: Callable[..., torch.Tensor]
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    amp: bool
    batches: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    data_loader: Any = None

    @property
    def images_per_call(self) -> int:
        return sum(int(b["image"].shape[0]) for b in self.batches)


def phantom_captions(count: int, seed: int = 0, empty_fraction: float = EMPTY_PROMPT_FRACTION) -> list[str]:
    """``count`` captions in the brain phantoms' template (ages 45-85, three ventricle sizes), some emptied."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        if rng.random() < empty_fraction:
            captions.append("")
            continue
        size = rng.choice(("small", "medium", "large"))
        captions.append(
            f"T1-weighted image of a brain of a {rng.randint(45, 85)} year old subject with {size} ventricles."
        )
    return captions


def make_batches(
    num_batches: int, batch_size: int, image_size: Sequence[int], tokenizer: Any, seed: int = 0
) -> list[dict[str, Any]]:
    """Training batches: random images ``(B, 1, H, W)`` in [0, 1], captions, and their CLIP token ids ``(B, 77)``."""
    generator = torch.Generator().manual_seed(seed)
    captions = phantom_captions(num_batches * batch_size, seed)
    batches = []
    for i in range(num_batches):
        caption = captions[i * batch_size : (i + 1) * batch_size]
        ids, _ = tokenize_prompts(tokenizer, caption)
        images = torch.rand((batch_size, 1, *image_size), generator=generator)
        batches.append({"image": images, "caption": caption, "input_ids": ids})
    return batches


def seed_style_loss(
    model: torch.nn.Module,
    text_encoder: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The seed step's loss: scaled latents ``(B, c, h, w)``, ids ``(B, 77)``, noise, timesteps ``(B,)`` -> MSE to v."""
    prompt_embeds = text_encoder(input_ids)[0]
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    prediction = model(x=noisy, timesteps=timesteps, context=prompt_embeds)
    target = scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())


def seed_style_step(
    model: torch.nn.Module,
    autoencoder: torch.nn.Module,
    text_encoder: torch.nn.Module,
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    scale_factor: float,
    batch: dict[str, Any],
) -> torch.Tensor:
    """One seed-style optimiser step on ``batch`` (images ``(B, 1, H, W)``, ``input_ids`` ``(B, 77)``); returns the loss."""
    model.train()
    images, input_ids = batch["image"], batch["input_ids"]
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],), device=images.device).long()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        latents = autoencoder.encode_stage_2_inputs(images) * scale_factor
    noise = torch.randn_like(latents)
    loss = seed_style_loss(model, text_encoder, scheduler, latents, input_ids, noise, timesteps)
    loss.backward()
    optimizer.step()
    return loss.detach()


def bf16_inferer(setup: TrainingSetup) -> Any | None:
    """The bundle's training inferer with ``--precision bf16`` (where the checkout's config has the option), else None."""
    try:
        from common.engines.precision import AutocastInferer
    except ImportError:  # a checkout from before the option
        return None
    if not isinstance(setup.inferer, AutocastInferer) or setup.inferer.precision != "fp32":
        return None
    return AutocastInferer(setup.inferer.inferer, "bf16")


class FirstBatches:
    """The first ``count`` batches of a new pass over ``loader``, each time it is iterated.

    A run of Ignite's engine on it is ``count`` iterations of the loader as training uses it (shuffled anew); a
    finished engine restarted on the loader itself would take all of its batches, whatever ``epoch_length`` was.
    """

    def __init__(self, loader: Any, count: int) -> None:
        self.loader = loader
        self.count = int(count)

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.loader), self.count)

    def __len__(self) -> int:
        return self.count


def bundle_trainer(
    setup: TrainingSetup,
    network: torch.nn.Module,
    batches: list[dict[str, Any]],
    inferer: Any = None,
    compile: bool = False,
) -> SupervisedTrainer:
    """The bundle's ``SupervisedTrainer`` (as ``train#trainer``), on ``batches`` and without handlers.

    ``batches`` is a list of prepared batches or an iterable of them (:class:`FirstBatches`); ``inferer`` replaces
    the config's ``train#inferer`` (the bf16 candidate); ``compile`` is the config's ``--compile`` (MONAI's trainer
    compiles the network with ``torch.compile``).
    """
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=network,
        optimizer=setup.optimizer(network.parameters()),
        loss_function=setup.loss_function,
        prepare_batch=setup.prepare_batch,
        inferer=setup.inferer if inferer is None else inferer,
        amp=setup.amp,
        decollate=False,
        compile=compile,
    )


def seed_text_encoder(setup: TrainingSetup) -> torch.nn.Module:
    """A copy of the bundle's text tower as the seed code has it: eval mode, parameters requiring gradients."""
    return copy.deepcopy(setup.prepare_batch.prompt_encoder.text_model).eval().requires_grad_(True)


def moment_keys() -> tuple[str, str] | None:
    """Batch keys of cached latent moments if this checkout's ``LatentDiffusionPrepareBatch`` reads them, else ``None``."""
    from common.diffusion import latent_space

    keys = (getattr(latent_space, "MU_KEY", None), getattr(latent_space, "SIGMA_KEY", None))
    if None in keys or not hasattr(latent_space.ScaledLatentSpace, "moments"):
        return None
    return keys  # type: ignore[return-value]


def cached_moment_batches(setup: TrainingSetup) -> list[dict[str, Any]] | None:
    """``setup.batches`` as the latent cache hands them to training: posterior moments ``(B, c, h, w)`` in place of
    the images (encoded once, here, untimed), captions kept; ``None`` where the checkout has no latent cache."""
    keys = moment_keys()
    if keys is None:
        return None
    latent_space = setup.prepare_batch.latent_space
    batches = []
    for batch in setup.batches:
        z_mu, z_sigma = latent_space.moments(batch["image"])
        batches.append({keys[0]: z_mu, keys[1]: z_sigma, "caption": batch["caption"]})
    return batches


def training_candidates(setup: TrainingSetup, compile: bool = False) -> dict[str, Callable[[], None]]:
    """One pass each over the same batches: the bundle's trainer (from cached latent moments where the checkout can,
    and encoding images at every step), the seed-style step, and the frozen encoding alone.

    Each training candidate trains its own UNet copy with its own optimiser. ``compile`` adds
    ``bundle_cached_latents_bf16_compiled``: the bf16 trainer with ``--compile True`` (compiled in its untimed
    warm-up call).
    """
    latent_space = setup.prepare_batch.latent_space
    scheduler = setup.prepare_batch.scheduler
    model = monai_default_attention(setup.network).train()  # the seed code's UNet: MONAI's default attention
    optimizer = setup.optimizer(model.parameters())
    text_encoder = seed_text_encoder(setup)
    candidates: dict[str, Callable[[], None]] = {}
    cached = cached_moment_batches(setup)
    # Ignite restarts a finished run from its first iteration: ``run`` is one pass over the batches.
    if cached is not None:
        candidates["bundle_cached_latents"] = bundle_trainer(setup, copy.deepcopy(setup.network), cached).run
        bf16 = bf16_inferer(setup)
        if bf16 is not None:  # the config's --precision bf16
            trainer = bundle_trainer(setup, copy.deepcopy(setup.network), cached, inferer=bf16)
            candidates["bundle_cached_latents_bf16"] = trainer.run
            if compile:
                trainer = bundle_trainer(setup, copy.deepcopy(setup.network), cached, inferer=bf16, compile=True)
                candidates["bundle_cached_latents_bf16_compiled"] = trainer.run
            if setup.data_loader is not None:
                batches = FirstBatches(setup.data_loader, len(cached))
                trainer = bundle_trainer(setup, copy.deepcopy(setup.network), batches, inferer=bf16)
                candidates["bundle_cached_latents_bf16_data_loader"] = trainer.run
    candidates["bundle_encoding"] = bundle_trainer(setup, copy.deepcopy(setup.network), setup.batches).run

    def seed() -> None:
        for batch in setup.batches:
            seed_style_step(
                model, latent_space.autoencoder, text_encoder, scheduler, optimizer, latent_space.scale_factor, batch
            )

    def encode_only() -> None:
        for batch in setup.batches:
            latent_space.encode(batch["image"])

    candidates["seed_style"] = seed
    candidates["encode_only"] = encode_only
    return candidates


def loss_agreement(setup: TrainingSetup, batch: dict[str, Any], seed: int = 0, inferer: Any = None) -> float:
    """``|bundle loss - seed-style loss|`` on ``batch``, with the latents, noise and timesteps the bundle drew.

    A check that the two compute the same training objective (v target, noising, context) before timing; ``batch``
    is one of ``setup.batches`` or its cached-moments form (the seed-style side reads the token ids of the first).
    ``inferer`` replaces the bundle's (the bf16 candidate: the difference is then its rounding).
    """
    network = copy.deepcopy(setup.network).train()
    torch.manual_seed(seed)
    latents, target, _, kwargs = setup.prepare_batch(batch, torch.device("cpu"))
    with torch.no_grad():
        inferer = setup.inferer if inferer is None else inferer
        bundle_loss = setup.loss_function(inferer(latents, network, **kwargs), target).mean()
        seed_loss = seed_style_loss(
            network,
            seed_text_encoder(setup),
            setup.prepare_batch.scheduler,
            latents,
            setup.batches[0]["input_ids"],
            kwargs["noise"],
            kwargs["timesteps"],
        )
    return float((bundle_loss - seed_loss).abs())


def benchmark_training(setup: TrainingSetup, repeats: int, compile: bool = False) -> dict[str, Any]:
    """Check the losses agree, warm every candidate up once, then time ``repeats`` interleaved rounds (per image).

    The warm-up calls are timed apart (``warmup_seconds``): they hold a compiled candidate's compilation.
    """
    agreement = {"bundle_encoding": {"loss_abs_diff_vs_seed_style": loss_agreement(setup, setup.batches[0])}}
    cached = cached_moment_batches(setup)
    if cached is not None:
        agreement["bundle_cached_latents"] = {"loss_abs_diff_vs_seed_style": loss_agreement(setup, cached[0])}
        bf16 = bf16_inferer(setup)
        if bf16 is not None:
            diff = loss_agreement(setup, cached[0], inferer=bf16)
            agreement["bundle_cached_latents_bf16"] = {"loss_abs_diff_vs_seed_style": diff}
    candidates = training_candidates(setup, compile=compile)
    warmup = {}
    for name, run in candidates.items():
        start = time.perf_counter()
        run()
        warmup[name] = round(time.perf_counter() - start, 3)
    trials = run_interleaved(candidates, repeats)
    return {
        "order": list(candidates),
        "baseline": BASELINE,
        "memory_method": trials[0].memory_method,
        "agreement": agreement,
        "warmup_seconds": warmup,
        "candidates": summarize(trials, setup.images_per_call, BASELINE),
    }


def training_table(result: dict[str, Any]) -> str:
    """The markdown table of a :func:`benchmark_training` result (times per training image)."""
    headers = [
        "candidate",
        "median s/image",
        "min",
        "max",
        f"time / {result['baseline']}",
        "paired ratio",
        "peak RSS rise MiB",
        "loss abs diff vs seed_style",
    ]
    rows = []
    for name, c in result["candidates"].items():
        per = c["seconds_per_item"]
        diff = result["agreement"].get(name, {}).get("loss_abs_diff_vs_seed_style")
        rows.append(
            [
                name,
                per["median"],
                per["min"],
                per["max"],
                c["time_ratio"],
                c["paired_ratio"],
                c["rss_increase_mib"],
                diff,
            ]
        )
    return markdown_table(headers, rows)


def optimizer_factory(parser: Any) -> Callable[[Any], torch.optim.Optimizer]:
    """The config's ``optimizer`` (class and arguments) for any parameters, so each candidate gets its own."""
    from monai.utils import instantiate

    declared = parser.config["optimizer"]
    kwargs = {
        k: parser.get_parsed_content(f"optimizer#{k}") for k in declared if not k.startswith("_") and k != "params"
    }
    return lambda params: instantiate(declared["_target_"], "default", params=params, **kwargs)


def config_data_loader(parser: Any, dataset_size: int, work_dir: Path, seed: int = 0) -> Any:
    """The config's ``train#dataloader`` over ``dataset_size`` random slices, served as training serves them.

    The slices are written to ``work_dir`` as NIfTI files with phantom-style captions; the config's ``latent_cache``
    encodes them once (its file goes to ``work_dir`` too) and its ``train#dataset`` (``CacheDataset`` with
    ``train#preprocessing``: prompt dropout) and ``train#dataloader`` (batch ``ldm_batch_size``, shuffled, in the
    main process) serve them.
    """
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    size = parser.get_parsed_content("image_size")
    items = []
    for index, caption in enumerate(phantom_captions(dataset_size, seed, empty_fraction=0.0)):
        path = work_dir / f"slice_{index:05d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random(size, dtype=np.float32), np.eye(4)), str(path))
        items.append({"image": str(path), "caption": caption})
    parser["run_dir"] = str(work_dir)
    parser["num_workers"] = 0  # as the demo's CPU commands run (worker processes would take the timed thread's core)
    parser["train#dataset#data"] = "@benchmark_items"
    parser["train#dataset#progress"] = False
    parser["benchmark_items"] = parser.get_parsed_content("latent_cache")(items)
    return parser.get_parsed_content("train#dataloader")


def load_training_setup(
    bundle_root: str | Path,
    batch_size: int,
    iterations: int,
    seed: int = 0,
    dataset_size: int = 0,
    work_dir: str | Path | None = None,
) -> TrainingSetup:
    """The bundle's diffusion training parts, built by its ``train_autoencoder.json`` + ``train_diffusion.json``.

    The shipped demo autoencoder and text encoder are loaded as training would; the UNet is the config's declaration
    holding the shipped UNet's weights (as when fine-tuning: a fresh UNet's zero-initialised output layer would make
    the loss checks vacuous; a step costs the same); the latent scale factor is the shipped diffusion weights'.
    With ``dataset_size`` (and a ``work_dir`` for its files), also the config's data loader over a data set of that
    many slices (:func:`config_data_loader`).
    """
    from monai.bundle import ConfigParser

    from common.io.weights import load_weights

    root = Path(bundle_root)
    configs = root / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train_autoencoder.json"), str(configs / "train_diffusion.json")])
    parser.read_meta(str(configs / "metadata.json"))
    diffusion = load_weights(str(root / "models" / "diffusion_model.pt"))
    parser["bundle_root"] = str(root)
    parser["device"] = "$torch.device('cpu')"
    parser["scale_factor"] = float(diffusion["latent"]["scale_factor"])
    parser["ldm_batch_size"] = batch_size
    prepare_batch = parser.get_parsed_content("prepare_batch")
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(diffusion["unet"])
    batches = make_batches(
        iterations, batch_size, parser.get_parsed_content("image_size"), prepare_batch.prompt_encoder.tokenizer, seed
    )
    data_loader = None
    if dataset_size:
        if work_dir is None:
            raise ValueError("A data set of `dataset_size` slices needs a `work_dir` for its files.")
        data_loader = config_data_loader(parser, dataset_size, Path(work_dir), seed)
    return TrainingSetup(
        network=network,
        prepare_batch=prepare_batch,
        data_loader=data_loader,
        inferer=parser.get_parsed_content("train#inferer"),
        loss_function=parser.get_parsed_content("train#trainer#loss_function"),
        optimizer=optimizer_factory(parser),
        amp=bool(parser.get_parsed_content("use_amp")),
        batches=batches,
        extra={
            "config_cache_latents": parser.get_parsed_content("cache_latents")
            if "cache_latents" in parser.config
            else None
        },
    )


def training_settings(setup: TrainingSetup, repeats: int) -> dict[str, Any]:
    """The knobs of a run, for the report."""
    first = setup.batches[0]
    return {
        "batch_size": int(first["image"].shape[0]),
        "iterations": len(setup.batches),
        "repeats": repeats,
        "image_size": list(first["image"].shape[2:]),
        "amp": setup.amp,
        "distinct_prompts": len({c for b in setup.batches for c in b["caption"]}),
        "data_loader_dataset_size": None if setup.data_loader is None else len(setup.data_loader.dataset),
        **setup.extra,
    }
