"""Sampling benchmark: a bundle's guided sampler against anchor-style loops, from the same noise, interleaved.

Candidates (each a call ``() -> images (B, 1, H, W)``):

* ``bundle``: what ``configs/inference.json`` runs per batch: the bundle's ``prepare_batch`` (prompt contexts,
  one generator per sample) then its ``inferer`` (``GuidedLatentSampler`` / ``ControlNetGuidedSampler``), which
  batches ``[uncond, cond]`` through the network once per step and decodes. Writing the images is left out.
  It runs the benchmark's ``--steps`` in float32: the reference the anchors' images are checked against.
* ``bundle_bf16``: the same sampler with ``--precision bf16``.
* ``bundle_default`` (where ``inference.json``'s defaults are not float32, guidance on every step, at ``--steps``):
  the bundle's sampler as the config runs it without options, its own ``num_inference_steps``, ``precision`` and
  ``guidance_interval``, and with ``guidance_distillation`` ``auto`` the guidance-distilled UNet where the bundle
  has one for the guidance benchmarked (one call of ``B`` per step; the others run the diffusion model).
* ``zoo_batched``: the MONAI Model Zoo CXR bundle's loop (``scripts/sampler.py`` of
  ``cxr_image_synthesis_latent_diffusion_model``): ``[x, x]`` with ``[uncond, cond]`` contexts through the
  network once per step, timesteps ``torch.Tensor((t,)).long()``, guidance, ``scheduler.step``, decode. It always
  runs both halves, whatever the guidance scale. The baseline of the ratios.
* ``seed_two_call``: the source article's notebook loop: the network twice per step (unconditional, then
  conditional, each on ``B`` images), then the same guidance and step.
* ``monai_inferer``: MONAI's ``LatentDiffusionInferer.sample`` called without ``cfg``, its ``diffusion_model`` a
  function that batches ``[uncond, cond]`` and applies the guidance. Its built-in ``cfg=`` cannot serve: it
  feeds a constant tensor (``cfg_fill_value``) as the unconditional context, not the empty prompt's embedding the
  models were trained with (its images are compared, untimed, as ``monai_builtin_cfg``).

For the ControlNet bundle, the loops' network call is the ControlNet then the frozen UNet with its residuals,
written plainly (not through the bundle's classes). MONAI's ``ControlNetLatentDiffusionInferer`` is not a
candidate: it resizes the condition to latent size, which breaks a ControlNet whose conditioning embedding
downsamples it x8 (see ``/work/shared/DESIGN.md``); ``monai_inferer`` uses ``LatentDiffusionInferer`` around the
ControlNet call instead.

The anchors run DDIM with ``eta`` 0 (as the zoo and the article do); with the bundle's ``eta`` at 0 all four
candidates compute the same images, up to float rounding (batches of different sizes take different kernels).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.inferers import LatentDiffusionInferer
from torch.utils.data import default_collate

from common.diffusion.sampling import ControlNetGuidedSampler, GuidedLatentSampler
from common.diffusion.schedules import SchedulerSettings
from tools.benchmarks.timing import markdown_table, run_interleaved, summarize

#: ``(x (N, c, h, w), timesteps (1,) or (N,), context (N, 77, D)) -> model output (N, c, h, w)``.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BASELINE = "zoo_batched"
REFERENCE = "bundle"


def calls_per_step(name: str, guidance: float, sampler: GuidedLatentSampler | None = None) -> str:
    """Network calls (UNet, or ControlNet + UNet) per denoising step x their batch, for ``B`` images.

    The bundle's sampler and the MONAI candidate run one half only at guidance 0 or 1; the anchors always run both.
    ``sampler`` (a bundle candidate's) says more where it skips guidance: a distilled network, or an interval.
    """
    if name == "seed_two_call":
        return "2 x B"
    if (name.startswith("bundle") or name == "monai_inferer") and guidance in (0.0, 1.0):
        return "1 x B"
    if sampler is not None and sampler.distilled_guidance is not None:
        return "1 x B (guidance-distilled UNet)"
    if sampler is not None and sampler.guidance_interval is not None:
        guided, steps = sampler.guided_steps(), sampler.num_inference_steps
        return f"1 x 2B on {guided} of {steps} steps, else 1 x B"
    return "1 x 2B"


#: Largest max-abs image difference (images in about [0, 1]) still called "the same image": rounding differences
#: between batch sizes, grown over the denoising steps.
SAME_IMAGE_ATOL = 1e-3


@dataclass
class SamplingSetup:
    """Everything the candidates share.

    Attributes:
        sampler: the bundle's inferer; its ``num_inference_steps``, ``guidance_scale``, ``eta`` and scheduler
            settings are the benchmark's.
        network: what the bundle's evaluator passes to the sampler (the UNet, or the ControlNet).
        prepare_batch: the bundle's ``PromptSamplingPrepareBatch``.
        batch: collated sample requests: ``noise`` ``(B, c, h, w)``, ``prompt`` (B strings), ``seed`` ``(B,)``, and
            ``condition`` ``(B, 1, H, W)`` for a ControlNet.
        denoise: the same network call written plainly, for the anchor loops, on copies of the networks with
            MONAI's default attention (:func:`monai_default_attention`).
        settings: the training noise schedule (from the diffusion weights).
        extra: further facts for the report (image size, prompt).
        default_sampler: the bundle's sampler with the config's own ``num_inference_steps`` and ``precision``
            where those differ from the benchmark's (``sampler`` runs the benchmark's steps in float32, the
            reference the anchors' images are checked against); ``None`` where they are the same.
        default_network: the network ``default_sampler`` runs where it is not ``network`` (the guidance-distilled
            UNet), else ``None``.
    """

    bundle: str
    sampler: GuidedLatentSampler
    network: torch.nn.Module
    prepare_batch: Callable[..., Any]
    batch: dict[str, Any]
    denoise: Denoiser
    settings: SchedulerSettings
    extra: dict[str, Any] = field(default_factory=dict)
    default_sampler: GuidedLatentSampler | None = None
    default_network: torch.nn.Module | None = None

    @property
    def num_samples(self) -> int:
        return int(self.batch["noise"].shape[0])

    def prepared(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The bundle's sampler inputs, fresh (its per-sample generators are state): noise and keyword arguments."""
        noise, _, _, kwargs = self.prepare_batch(self.batch, torch.device("cpu"))
        return noise, kwargs


def monai_default_attention(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with attention as MONAI builds it by default (einsums, ``use_flash_attention`` False),
    as the anchors' code has it; the bundle's own networks run attention through SDPA where the checkout does."""
    network = copy.deepcopy(network).eval()
    try:
        from common.networks.attention import set_sdpa
    except ImportError:  # a checkout from before SDPA: its networks already use MONAI's default
        return network
    return set_sdpa(network, enabled=False)


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """The plain text-conditioned UNet call."""

    def denoise(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x, timesteps=timesteps, context=context)

    return denoise


def controlnet_denoiser(
    controlnet: torch.nn.Module, unet: torch.nn.Module, condition: torch.Tensor, conditioning_scale: float
) -> Denoiser:
    """ControlNet on ``condition`` ``(B, 1, H, W)``, then the UNet with its residuals (the article's sampling loop).

    The condition is repeated to the batch of ``x`` (``2B`` when both guidance halves run at once).
    """

    def denoise(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        cond = condition.repeat(x.shape[0] // condition.shape[0], 1, 1, 1)
        down, mid = controlnet(
            x=x, timesteps=timesteps, context=context, controlnet_cond=cond, conditioning_scale=conditioning_scale
        )
        return unet(
            x=x,
            timesteps=timesteps,
            context=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )

    return denoise


def _timestep(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # As in the zoo and the article: one timestep of shape (1,), broadcast over the batch by the network.
    return torch.Tensor((t,)).to(device).long()


@torch.no_grad()
def zoo_batched_latents(
    denoise: Denoiser,
    scheduler: Any,
    noise: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    guidance: float,
    steps: int,
) -> torch.Tensor:
    """The zoo CXR loop: noise ``(B, c, h, w)``, contexts ``(B, 77, D)`` -> latents ``(B, c, h, w)``; 1 call of 2B/step."""
    scheduler.set_timesteps(steps)
    prompt_embeds = torch.cat([uncond_context, context])
    x = noise
    for t in scheduler.timesteps:
        output = denoise(torch.cat([x] * 2), _timestep(t, x.device), prompt_embeds)
        pred_uncond, pred_cond = output.chunk(2)
        x, _ = scheduler.step(pred_uncond + guidance * (pred_cond - pred_uncond), t, x)
    return x


@torch.no_grad()
def seed_two_call_latents(
    denoise: Denoiser,
    scheduler: Any,
    noise: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    guidance: float,
    steps: int,
) -> torch.Tensor:
    """The notebook loop: noise ``(B, c, h, w)``, contexts ``(B, 77, D)`` -> latents; 2 calls of B per step."""
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        timesteps = _timestep(t, x.device)
        pred_uncond = denoise(x, timesteps, uncond_context)
        pred_cond = denoise(x, timesteps, context)
        x, _ = scheduler.step(pred_uncond + guidance * (pred_cond - pred_uncond), t, x)
    return x


def guided(denoise: Denoiser, guidance: float) -> Denoiser:
    """A network for MONAI's sampling loop: context ``[uncond; cond]`` ``(2B, 77, D)``, ``x`` ``(B, ...)`` -> guided output."""

    def model(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        pred_uncond, pred_cond = denoise(torch.cat([x, x]), timesteps, context).chunk(2)
        return pred_uncond + guidance * (pred_cond - pred_uncond)

    return model


@torch.no_grad()
def monai_inferer_images(
    denoise: Denoiser,
    scheduler: Any,
    autoencoder: torch.nn.Module,
    scale_factor: float,
    noise: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    guidance: float,
    steps: int,
    builtin_cfg: bool = False,
) -> torch.Tensor:
    """``LatentDiffusionInferer.sample``: noise ``(B, c, h, w)`` -> images ``(B, C, H, W)``.

    Without ``builtin_cfg``, called with ``cfg=None`` and a guiding network (one call of 2B per step; at guidance 0
    or 1 the plain network on the matching context). With ``builtin_cfg``, MONAI's ``cfg=guidance``: its
    unconditional context is a tensor filled with ``cfg_fill_value`` (-1), so the images differ.
    """
    scheduler.set_timesteps(steps)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=scale_factor)
    common = {"input_noise": noise, "autoencoder_model": autoencoder, "scheduler": scheduler, "verbose": False}
    if builtin_cfg:
        return inferer.sample(diffusion_model=denoise, conditioning=context, cfg=guidance, **common)
    if guidance in (0.0, 1.0):
        ctx = uncond_context if guidance == 0.0 else context
        return inferer.sample(diffusion_model=denoise, conditioning=ctx, **common)
    return inferer.sample(
        diffusion_model=guided(denoise, guidance), conditioning=torch.cat([uncond_context, context]), **common
    )


def sampling_candidates(setup: SamplingSetup, compile: bool = False) -> dict[str, Callable[[], torch.Tensor]]:
    """The candidates of the module docstring, as calls ``() -> images (B, C, H, W)``, in interleaving order.

    ``compile`` adds ``bundle_default_compiled``: the config's default sampler with ``--compile True``.
    """
    sampler = setup.sampler
    steps, guidance = sampler.num_inference_steps, sampler.guidance_scale
    latent_space = sampler.latent_space
    _, kwargs = setup.prepared()
    noise = setup.batch["noise"]
    context, uncond = kwargs["context"], kwargs["uncond_context"]

    def decode(latents: torch.Tensor) -> torch.Tensor:
        # As the anchors do: the autoencoder's own decode of unscaled latents.
        with torch.no_grad():
            return latent_space.autoencoder.decode_stage_2_outputs(latents / latent_space.scale_factor)

    def bundle() -> torch.Tensor:
        inputs, prepared = setup.prepared()
        return sampler(inputs, setup.network, **prepared)

    def zoo() -> torch.Tensor:
        scheduler = setup.settings.build("ddim")
        return decode(zoo_batched_latents(setup.denoise, scheduler, noise, context, uncond, guidance, steps))

    def seed() -> torch.Tensor:
        scheduler = setup.settings.build("ddim")
        return decode(seed_two_call_latents(setup.denoise, scheduler, noise, context, uncond, guidance, steps))

    def monai() -> torch.Tensor:
        scheduler = setup.settings.build("ddim")
        ae, scale = latent_space.autoencoder, latent_space.scale_factor
        return monai_inferer_images(setup.denoise, scheduler, ae, scale, noise, context, uncond, guidance, steps)

    candidates = {"bundle": bundle, "zoo_batched": zoo, "seed_two_call": seed, "monai_inferer": monai}
    default = setup.default_sampler
    same_as_bf16 = default is not None and (
        default.num_inference_steps,
        default.precision,
        default.guidance_interval,
        default.distilled_guidance,
    ) == (sampler.num_inference_steps, "bf16", None, None)
    if getattr(sampler, "precision", None) == "fp32" and not same_as_bf16:  # else bundle_default is that
        fast = sampler.replaced(precision="bf16")

        def bundle_bf16() -> torch.Tensor:
            inputs, prepared = setup.prepared()
            return fast(inputs, setup.network, **prepared)

        candidates["bundle_bf16"] = bundle_bf16  # the bundle's sampler with --precision bf16
    default_network = setup.default_network or setup.network
    if setup.default_sampler is not None:
        default_sampler = setup.default_sampler

        def bundle_default() -> torch.Tensor:
            inputs, prepared = setup.prepared()
            return default_sampler(inputs, default_network, **prepared)

        candidates["bundle_default"] = bundle_default  # what inference.json runs without options
    if compile:
        compiled = (setup.default_sampler or sampler).replaced(compile=True)

        def bundle_default_compiled() -> torch.Tensor:
            inputs, prepared = setup.prepared()
            return compiled(inputs, default_network, **prepared)

        candidates["bundle_default_compiled"] = bundle_default_compiled  # the same with --compile True
    return candidates


def monai_builtin_cfg_images(setup: SamplingSetup) -> torch.Tensor:
    """Images ``(B, C, H, W)`` of ``LatentDiffusionInferer.sample(cfg=guidance)``, unconditional context -1 everywhere."""
    sampler = setup.sampler
    latent_space = sampler.latent_space
    noise, kwargs = setup.prepared()
    return monai_inferer_images(
        setup.denoise,
        setup.settings.build("ddim"),
        latent_space.autoencoder,
        latent_space.scale_factor,
        noise,
        kwargs["context"],
        kwargs["uncond_context"],
        sampler.guidance_scale,
        sampler.num_inference_steps,
        builtin_cfg=True,
    )


def unexpected_differences(agreement: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Names whose images should equal the bundle's and do not: a baseline that is not faithful."""
    return [name for name, a in agreement.items() if a["expected_same"] and not a["same"]]


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` over all pixels of two image batches of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"Image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}.")
    return float((a.float() - b.float()).abs().max())


def image_agreement(
    outputs: Mapping[str, torch.Tensor], expected_same: Mapping[str, bool], reference: str = REFERENCE
) -> dict[str, dict[str, Any]]:
    """Per output: max abs difference to ``outputs[reference]``, whether it should be the same, whether it is."""
    ref = outputs[reference]
    agreement = {}
    for name, images in outputs.items():
        if name == reference:
            continue
        diff = max_abs_difference(images, ref)
        agreement[name] = {
            "max_abs_diff_vs_bundle": diff,
            "expected_same": bool(expected_same.get(name, True)),
            "same": diff <= SAME_IMAGE_ATOL,
        }
    return agreement


def benchmark_sampling(setup: SamplingSetup, repeats: int, compile: bool = False) -> dict[str, Any]:
    """Warm every candidate up (its images are the agreement check), then time ``repeats`` interleaved rounds.

    Returns ``{"order", "baseline", "agreement", "warmup_seconds", "candidates"}``: per candidate the summary of
    :func:`tools.benchmarks.timing.summarize` (per image) plus its network calls per step; the warm-up call (a
    compiled candidate's compilation) is timed apart.
    """
    candidates = sampling_candidates(setup, compile=compile)
    outputs, warmup = {}, {}
    for name, run in candidates.items():
        start = time.perf_counter()
        outputs[name] = run()
        warmup[name] = round(time.perf_counter() - start, 3)
    sampler = setup.sampler
    # The anchors have no DDIM noise (eta 0): with the bundle's eta above 0 its images are expected to differ.
    # bf16 rounds differently; the config's defaults may take other steps or skip guidance on some
    different = ("bundle_bf16", "bundle_default", "bundle_default_compiled")
    same = {name: sampler.eta == 0.0 and name not in different for name in candidates}
    if sampler.guidance_scale != 1.0:  # at 1 MONAI's cfg keeps the conditional half only: no difference to show
        outputs["monai_builtin_cfg"] = monai_builtin_cfg_images(setup)
        same["monai_builtin_cfg"] = False
    agreement = image_agreement(outputs, same)
    trials = run_interleaved(candidates, repeats)
    summary = summarize(trials, setup.num_samples, BASELINE)
    default = setup.default_sampler
    for name in summary:
        own = default if name in ("bundle_default", "bundle_default_compiled") else None
        summary[name]["calls_per_step"] = calls_per_step(name, sampler.guidance_scale, own)
    return {
        "order": list(candidates),
        "baseline": BASELINE,
        "memory_method": trials[0].memory_method,
        "agreement": agreement,
        "warmup_seconds": warmup,
        "candidates": summary,
    }


def sampling_table(result: Mapping[str, Any]) -> str:
    """The markdown table of a :func:`benchmark_sampling` result (times per image)."""
    headers = [
        "candidate",
        "network calls/step",
        "median s/image",
        "min",
        "max",
        f"time / {result['baseline']}",
        "paired ratio",
        "peak RSS rise MiB",
        "max abs diff vs bundle",
        "first call s",
    ]
    rows = []
    for name, c in result["candidates"].items():
        diff = result["agreement"].get(name, {}).get("max_abs_diff_vs_bundle")
        per = c["seconds_per_item"]
        rows.append(
            [
                name,
                c["calls_per_step"],
                per["median"],
                per["min"],
                per["max"],
                c["time_ratio"],
                c["paired_ratio"],
                c["rss_increase_mib"],
                diff,
                result.get("warmup_seconds", {}).get(name),
            ]
        )
    for name, a in result["agreement"].items():
        if name not in result["candidates"]:
            rows.append(
                [f"{name} (untimed)", "1 x 2B", None, None, None, None, None, None, a["max_abs_diff_vs_bundle"], None]
            )
    return markdown_table(headers, rows)


def load_sampling_setup(
    bundle_root: str | Path,
    num_samples: int,
    steps: int,
    guidance: float | None,
    eta: float,
    seed: int,
) -> SamplingSetup:
    """The shipped demo networks and the bundle's sampler, built by the bundle's own ``configs/inference.json``.

    The config's requests (one prompt, or the example FLAIR slice) are repeated to ``num_samples`` with seeds
    ``seed + i``; ``guidance`` ``None`` keeps the config's guidance scale.
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    precision = parser.get("precision", "fp32")
    if precision == "auto":  # what the config resolves it to on this machine's CPU
        from common.engines.precision import resolve_precision

        precision = resolve_precision(precision, "cpu")
    defaults = {
        "num_inference_steps": parser["num_inference_steps"],
        "precision": precision,
        "guidance_interval": parser.get("guidance_interval"),
    }
    overrides: dict[str, Any] = {
        "bundle_root": str(root),
        "device": "$torch.device('cpu')",
        "progress": False,
        "num_inference_steps": int(steps),
        "eta": float(eta),
        "seed": int(seed),
        "batch_size": int(num_samples),
    }
    if "precision" in parser.config:
        overrides["precision"] = "fp32"
    if "guidance_interval" in parser.config:  # the reference guides every step
        overrides["guidance_interval"] = None
    if "guidance_distillation" in parser.config:  # ... with the diffusion model, not its guidance-distilled student
        defaults["guidance_distillation"] = parser["guidance_distillation"]
        overrides["guidance_distillation"] = False
    if guidance is not None:
        overrides["guidance_scale"] = float(guidance)
    if "num_samples" in parser.config:
        overrides["num_samples"] = int(num_samples)
    for key, value in overrides.items():
        parser[key] = value
    sampler = parser.get_parsed_content("inferer")
    default_network, distilled = _default_distilled_network(parser, defaults, sampler.guidance_scale)
    default_sampler = None
    if (defaults["num_inference_steps"], defaults["precision"], defaults["guidance_interval"], distilled) != (
        int(steps),
        "fp32",
        None,
        None,
    ):
        default_sampler = sampler.replaced(
            num_inference_steps=int(defaults["num_inference_steps"]),
            precision=defaults["precision"],
            guidance_interval=defaults["guidance_interval"],
            distilled_guidance=distilled,
        )
    network = parser.get_parsed_content("network")
    preprocessing = parser.get_parsed_content("preprocessing")
    requests = parser.get_parsed_content("dataset#data")
    items = [{**requests[i % len(requests)], "seed": int(seed) + i} for i in range(int(num_samples))]
    batch = default_collate([preprocessing(item) for item in items])
    if isinstance(sampler, ControlNetGuidedSampler):
        base = monai_default_attention(sampler.diffusion_model)
        denoise = controlnet_denoiser(
            monai_default_attention(network), base, batch["condition"], sampler.conditioning_scale
        )
    else:
        denoise = unet_denoiser(monai_default_attention(network))
    return SamplingSetup(
        bundle=root.name,
        sampler=sampler,
        network=network.eval(),
        prepare_batch=parser.get_parsed_content("prepare_batch"),
        batch=batch,
        denoise=denoise,
        settings=parser.get_parsed_content("scheduler_settings"),
        extra={
            "image_size": list(parser.get_parsed_content("image_size")),
            "prompt": items[0].get("prompt", ""),
            "config_defaults": defaults,
        },
        default_sampler=default_sampler,
        default_network=default_network,
    )


def _default_distilled_network(
    parser: Any, defaults: Mapping[str, Any], guidance: float
) -> tuple[torch.nn.Module | None, float | None]:
    """The guidance-distilled UNet the config's defaults would sample with at ``guidance``, and its scale; or
    ``(None, None)`` (no such option, no student, or one for another guidance)."""
    if defaults.get("guidance_distillation", False) is False:
        return None, None
    from common.diffusion.distillation import choose_distilled_weights, distilled_scale
    from common.networks.architecture import network_from_weights

    path = parser.get_parsed_content("distilled_path")
    weights = choose_distilled_weights(
        path,
        defaults["guidance_distillation"],
        guidance,
        defaults["guidance_interval"],
        parser.get_parsed_content("checked_diffusion_weights"),
        parser.get_parsed_content("diffusion_path"),
    )
    if weights is None:
        return None, None
    return network_from_weights(weights, "unet", path).eval(), distilled_scale(weights)


def sampling_settings(setup: SamplingSetup, repeats: int) -> dict[str, Any]:
    """The knobs of a run, for the report."""
    sampler = setup.sampler
    return {
        "num_samples": setup.num_samples,
        "steps": sampler.num_inference_steps,
        "guidance": sampler.guidance_scale,
        "eta": sampler.eta,
        "scheduler": sampler.scheduler_name,
        "repeats": repeats,
        "latent_shape": list(setup.batch["noise"].shape[1:]),
        "conditioning_scale": getattr(sampler, "conditioning_scale", None),
        **setup.extra,
    }
