"""common.diffusion.sampling: knob validation, the guided latent sampler and the ControlNet sampler."""

from __future__ import annotations

import pytest
import torch

from common.diffusion.latent_space import ScaledLatentSpace
from common.diffusion.requests import SeededNoised, sample_requests
from common.diffusion.sampling import (
    ControlNetGuidedSampler,
    GuidedLatentSampler,
    check_sampling_settings,
    latent_shape,
)
from common.diffusion.schedules import SchedulerSettings
from common.networks.controlnet import controlnet_from_unet
from common.networks.freezing import freeze
from tests.conftest import (
    CONTEXT_DIM,
    IMAGE_SIZE,
    LATENT,
    LATENT_CHANNELS,
    CallRecorder,
    make_autoencoder,
    make_controlnet,
    make_unet,
)


def _sampler(latent_space, guidance_scale=3.0, scheduler="ddim", steps=3, eta=0.0, **settings):
    return GuidedLatentSampler(
        latent_space,
        SchedulerSettings(**settings),
        scheduler=scheduler,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        eta=eta,
        progress=False,
    )


def _contexts(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 77, CONTEXT_DIM, generator=g)
    uncond = torch.randn(1, 77, CONTEXT_DIM, generator=g).expand(batch, -1, -1)
    return cond, uncond


def _noise(seeds) -> torch.Tensor:
    noised = SeededNoised(LATENT)
    return torch.stack([noised({"seed": s})["noise"] for s in seeds])


# check_sampling_settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "guidance", "scheduler"), [(50, 7.0, "ddim"), (1000, 0.0, "ddpm"), (1, 1.0, "ddim")])
def test_valid_settings_build_a_sampler_that_uses_them(latent_space, steps, guidance, scheduler):
    sampler = GuidedLatentSampler(
        latent_space, SchedulerSettings(), scheduler=scheduler, num_inference_steps=steps, guidance_scale=guidance
    )
    sampler.scheduler.set_timesteps(sampler.num_inference_steps)
    assert len(sampler.scheduler.timesteps) == steps and sampler.guidance_scale == guidance
    assert sampler.scheduler_name == scheduler and not sampler.scheduler.clip_sample


@pytest.mark.parametrize(
    ("steps", "guidance", "scheduler", "match"),
    [
        (50, 7.0, "pndm", "Unknown scheduler 'pndm'"),
        (0, 7.0, "ddim", "num_inference_steps"),
        (-5, 7.0, "ddim", "num_inference_steps"),
        (2.5, 7.0, "ddim", "num_inference_steps"),
        (True, 7.0, "ddim", "num_inference_steps"),
        ("50", 7.0, "ddim", "num_inference_steps"),
        (1001, 7.0, "ddim", "exceeds the 1000 training timesteps"),
        (50, -0.5, "ddim", "guidance_scale"),
    ],
)
def test_bad_settings_name_the_knob(steps, guidance, scheduler, match):
    with pytest.raises(ValueError, match=match):
        check_sampling_settings(steps, guidance, scheduler, 1000)


def test_ddpm_with_fewer_steps_than_training_is_refused():
    # MONAI's DDPMScheduler steps t -> t - 1 whatever the stride: 50 of 1000 steps would decode to noise.
    with pytest.raises(ValueError, match="ddpm scheduler needs `num_inference_steps` equal to the 1000"):
        check_sampling_settings(50, 1.0, "ddpm", 1000)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_outside_unit_interval_is_refused(eta):
    with pytest.raises(ValueError, match="`eta` must be in"):
        check_sampling_settings(50, 1.0, "ddim", 1000, eta=eta)


def test_sampler_checks_settings_at_construction(latent_space):
    with pytest.raises(ValueError, match="exceeds the 100 training timesteps"):
        _sampler(latent_space, steps=200, num_train_timesteps=100)
    with pytest.raises(ValueError, match="guidance_scale"):
        _sampler(latent_space, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="scheduler"):
        _sampler(latent_space, scheduler="euler")


# latent_shape ----------------------------------------------------------------------------------------


def test_latent_shape(latent_space):
    assert latent_shape((16, 24), latent_space) == (LATENT_CHANNELS, 8, 12)


def test_latent_shape_not_divisible_names_the_factor():
    space = ScaledLatentSpace(make_autoencoder((8, 8, 8)), scale_factor=1.0)  # downsamples x4
    assert latent_shape((16, 32), space) == (LATENT_CHANNELS, 4, 8)
    with pytest.raises(ValueError, match="downsampling factor 4") as err:
        latent_shape((18, 32), space)
    assert "multiples of 4" in str(err.value)
    assert "(16, 32)" in str(err.value)  # a nearby valid size is suggested


def test_latent_shape_rejects_non_positive_size(latent_space):
    with pytest.raises(ValueError):
        latent_shape((0, 16), latent_space)


# sample_requests -------------------------------------------------------------------------------------


def test_sample_requests_seed_each_sample():
    requests = sample_requests("T1-weighted image of a brain.", num_samples=3, seed=10)
    assert requests == [{"prompt": "T1-weighted image of a brain.", "seed": 10 + i, "index": i} for i in range(3)]


@pytest.mark.parametrize(
    ("prompt", "num_samples", "seed", "match"),
    [
        ("", 1, 0, "empty"),
        ("   ", 1, 0, "empty"),
        (None, 1, 0, "string"),
        ("x" * 1001, 1, 0, "1001 characters"),
        ("brain", 0, 0, "num_samples"),
        ("brain", -1, 0, "num_samples"),
        ("brain", 2.0, 0, "num_samples"),
        ("brain", True, 0, "num_samples"),
        ("brain", 1, -1, "seed"),
        ("brain", 1, "3", "seed"),
        ("brain", 1, 1.5, "seed"),
        ("brain", 1, True, "seed"),
    ],
)
def test_sample_requests_validation(prompt, num_samples, seed, match):
    with pytest.raises(ValueError, match=match):
        sample_requests(prompt, num_samples, seed)


def test_sample_requests_prompt_limit_is_configurable():
    assert len(sample_requests("x" * 20, 1, 0, max_prompt_chars=20)) == 1
    with pytest.raises(ValueError):
        sample_requests("x" * 21, 1, 0, max_prompt_chars=20)


# SeededNoised ----------------------------------------------------------------------------------------


def test_seeded_noise_is_deterministic_and_standard_normal():
    noised = SeededNoised((3, 32, 32))
    a = noised({"seed": 7, "prompt": "p"})
    b = noised({"seed": 7})
    assert a["noise"].shape == (3, 32, 32)
    assert a["prompt"] == "p"
    torch.testing.assert_close(a["noise"], b["noise"], rtol=0, atol=0)
    assert not torch.equal(a["noise"], noised({"seed": 8})["noise"])
    assert abs(a["noise"].mean().item()) < 0.1 and abs(a["noise"].std().item() - 1) < 0.1


def test_seeded_noise_ignores_global_rng_and_does_not_mutate_input():
    noised = SeededNoised(LATENT)
    torch.manual_seed(1)
    data = {"seed": torch.tensor(3)}
    a = noised(data)["noise"]
    torch.manual_seed(2)
    torch.rand(100)
    b = noised(data)["noise"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "noise" not in data


def test_seeded_noise_depends_on_seed_not_on_position_in_batch():
    """Request i of a run with seed s gets the same noise as request 0 of a run with seed s + i."""
    noised = SeededNoised(LATENT, seed_key="s", noise_key="z")
    batch = [noised({"s": r["seed"]})["z"] for r in sample_requests("p", 3, seed=5)]
    alone = noised({"s": 7})["z"]
    torch.testing.assert_close(batch[2], alone, rtol=0, atol=0)


# GuidedLatentSampler ---------------------------------------------------------------------------------


def test_sampler_output_shape_and_determinism(latent_space, unet):
    sampler = _sampler(latent_space)
    noise = _noise([0, 1])
    cond, uncond = _contexts()
    a = sampler(noise, unet, context=cond, uncond_context=uncond)
    b = sampler(noise, unet, context=cond, uncond_context=uncond)
    assert a.shape == (2, 1, *IMAGE_SIZE)
    assert not a.requires_grad
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not unet.training


def test_guidance_zero_is_unconditional(latent_space, unet):
    noise = _noise([3, 4])
    cond, uncond = _contexts()
    unconditional = _sampler(latent_space, guidance_scale=0.0)(noise, unet, context=cond, uncond_context=uncond)
    conditional_on_uncond = _sampler(latent_space, guidance_scale=1.0)(
        noise, unet, context=uncond, uncond_context=torch.zeros_like(uncond)
    )
    torch.testing.assert_close(unconditional, conditional_on_uncond)
    # ... and the prompt does not matter at all.
    other_cond, _ = _contexts(seed=9)
    again = _sampler(latent_space, guidance_scale=0.0)(noise, unet, context=other_cond, uncond_context=uncond)
    torch.testing.assert_close(unconditional, again, rtol=0, atol=0)


def test_guidance_changes_the_image(latent_space, unet):
    noise = _noise([3, 4])
    cond, uncond = _contexts()
    g1 = _sampler(latent_space, guidance_scale=1.0)(noise, unet, context=cond, uncond_context=uncond)
    g7 = _sampler(latent_space, guidance_scale=7.0)(noise, unet, context=cond, uncond_context=uncond)
    assert not torch.allclose(g1, g7)


@pytest.mark.parametrize(("guidance", "factor"), [(0.0, 1), (1.0, 1), (3.0, 2)])
def test_network_calls_and_batch_sizes(latent_space, unet, guidance, factor):
    recorder = CallRecorder(unet)
    noise = _noise([0, 1, 2])
    cond, uncond = _contexts(3)
    _sampler(latent_space, guidance_scale=guidance, steps=4)(noise, recorder, context=cond, uncond_context=uncond)
    assert recorder.batch_sizes == [3 * factor] * 4
    if factor == 2:  # one batch [uncond, cond]
        torch.testing.assert_close(recorder.contexts[0], torch.cat([uncond, cond]))


class _LinearInContext(torch.nn.Module):
    """pred = x * 0 + context[:, 0, 0]: linear in the context, so guidance can be checked exactly."""

    def forward(self, x, timesteps, context):
        return x * 0 + context[:, 0, 0].reshape(-1, 1, 1, 1)


def test_guidance_extrapolates_from_uncond_towards_cond(latent_space):
    noise = _noise([0, 1])
    cond, uncond = _contexts()
    scale = 4.0
    guided = _sampler(latent_space, guidance_scale=scale).sample_latents(noise, _LinearInContext(), cond, uncond)
    mixed = uncond + scale * (cond - uncond)
    reference = _sampler(latent_space, guidance_scale=1.0).sample_latents(noise, _LinearInContext(), mixed, uncond)
    torch.testing.assert_close(guided, reference)


def test_each_image_depends_on_its_seed_not_on_the_batch(latent_space, unet):
    sampler = _sampler(latent_space)
    cond, uncond = _contexts()
    both = sampler(_noise([5, 6]), unet, context=cond, uncond_context=uncond)
    second_alone = sampler(_noise([6]), unet, context=cond[1:], uncond_context=uncond[1:])
    torch.testing.assert_close(both[1:], second_alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [{"scheduler": "ddpm", "steps": 3, "num_train_timesteps": 3}, {"scheduler": "ddim", "eta": 1.0}],
    ids=["ddpm", "ddim-eta1"],
)
def test_stochastic_sampling_is_repeatable_with_a_seeded_generator(latent_space, unet, kwargs):
    sampler = _sampler(latent_space, **kwargs)
    noise = _noise([0])
    cond, uncond = _contexts(1)

    def run(seed):
        return sampler(noise, unet, cond, uncond, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_sampler_decodes_with_the_latent_scale(unet):
    autoencoder = make_autoencoder()
    noise = _noise([0])
    cond, uncond = _contexts(1)
    s1 = _sampler(ScaledLatentSpace(autoencoder, 1.0))
    s2 = _sampler(ScaledLatentSpace(autoencoder, 2.0))
    latents = s1.sample_latents(noise, unet, cond, uncond)
    torch.testing.assert_close(s2(noise, unet, cond, uncond), autoencoder.decode_stage_2_outputs(latents / 2.0))


def test_ddim_eta_injects_noise_from_the_generator(latent_space, unet):
    noise = _noise([0])
    cond, uncond = _contexts(1)

    def run(eta):
        sampler = _sampler(latent_space, eta=eta, steps=4)
        return sampler(noise, unet, cond, uncond, generator=torch.Generator().manual_seed(1))

    assert not torch.allclose(run(0.0), run(1.0))


# ControlNetGuidedSampler ------------------------------------------------------------------------


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *LATENT, generator=g),
        torch.randn(batch, 77, CONTEXT_DIM, generator=g),
        torch.rand(batch, 1, *IMAGE_SIZE, generator=g),
    )


def _steering_controlnet(unet: torch.nn.Module) -> torch.nn.Module:
    """A ControlNet copied from ``unet`` whose zero convolutions are randomised, so the condition changes the output."""
    controlnet = controlnet_from_unet(make_controlnet(), unet.state_dict())
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "zero" in name or name.startswith("controlnet_"):
                p.normal_(0, 0.2)
    return controlnet


def _controlnet_sampler(latent_space, unet, **kwargs) -> ControlNetGuidedSampler:
    settings = {"num_inference_steps": 3, "guidance_scale": 3.0, "progress": False, **kwargs}
    return ControlNetGuidedSampler(
        latent_space, SchedulerSettings(num_train_timesteps=100), diffusion_model=unet, **settings
    )


def test_guided_sampler_uses_condition_and_scale(latent_space):
    unet = freeze(make_unet())
    controlnet = _steering_controlnet(unet)  # a trained ControlNet: non-zero output convolutions
    latents, context, cond = _inputs()
    uncond = torch.zeros_like(context)

    def sample(scale, guidance, condition):
        sampler = _controlnet_sampler(latent_space, unet, conditioning_scale=scale, guidance_scale=guidance)
        return sampler(latents, controlnet, context=context, uncond_context=uncond, controlnet_cond=condition)

    a = sample(1.0, 3.0, cond)
    assert a.shape == (2, 1, *IMAGE_SIZE)
    assert torch.equal(a, sample(1.0, 3.0, cond)), "deterministic with DDIM"
    assert not torch.allclose(a, sample(1.0, 3.0, cond.flip(0))), "the condition steers the output"
    # conditioning_scale 0 removes the ControlNet: the output no longer depends on the condition.
    assert torch.allclose(sample(0.0, 1.0, cond), sample(0.0, 1.0, cond.flip(0)))
    with pytest.raises(ValueError, match="conditioning_scale"):
        ControlNetGuidedSampler(latent_space, SchedulerSettings(), diffusion_model=unet, conditioning_scale=-1)
    controlnet_sampler = _controlnet_sampler(latent_space, unet)
    assert controlnet_sampler.replaced(conditioning_scale=2).conditioning_scale == 2.0
    with pytest.raises(ValueError, match="conditioning_scale"):
        controlnet_sampler.replaced(conditioning_scale=-0.5)


def test_embedding_the_condition_once_gives_what_embedding_it_at_every_step_gives(latent_space):
    """The ControlNet's conditioning embedding is computed once per batch: same images, embedding module restored."""
    unet = freeze(make_unet())
    controlnet = _steering_controlnet(unet)
    latents, context, cond = _inputs()
    sampler = _controlnet_sampler(latent_space, unet)
    uncond = torch.zeros_like(context)
    calls = []
    hook = controlnet.controlnet_cond_embedding.register_forward_hook(lambda *_: calls.append(1))
    fast = sampler(latents, controlnet, context=context, uncond_context=uncond, controlnet_cond=cond)
    assert len(calls) == 1, "embedded once, not at each of the 3 steps"
    hook.remove()
    every_step = GuidedLatentSampler.sample_latents(
        sampler, latents, controlnet, context, uncond, controlnet_cond=cond
    )  # the parent loop: the ControlNet embeds the condition itself at every step
    torch.testing.assert_close(fast, latent_space.decode(every_step), atol=1e-5, rtol=1e-5)
    assert not isinstance(controlnet.controlnet_cond_embedding, torch.nn.Identity)


def test_bf16_sampling_stays_close_to_fp32_and_unknown_precision_is_refused(latent_space):
    unet = make_unet()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, *LATENT, generator=g)
    context, uncond = torch.randn(2, 77, CONTEXT_DIM, generator=g), torch.zeros(2, 77, CONTEXT_DIM)

    def sample(precision):
        sampler = GuidedLatentSampler(
            latent_space,
            SchedulerSettings(num_train_timesteps=100),
            num_inference_steps=3,
            guidance_scale=3.0,
            progress=False,
            precision=precision,
        )
        return sampler.sample_latents(noise, unet, context, uncond)

    fp32, bf16 = sample("fp32"), sample("bf16")
    assert fp32.dtype == bf16.dtype == torch.float32  # the scheduler works in float32 either way
    assert not torch.equal(fp32, bf16), "bf16 autocast really ran"
    assert (fp32 - bf16).abs().max() < 0.1 * fp32.abs().max()
    with pytest.raises(ValueError, match="Unknown precision 'fp16'"):
        GuidedLatentSampler(latent_space, SchedulerSettings(), precision="fp16")


# guidance interval -------------------------------------------------------------------------------------


def _interval_sampler(latent_space, interval, guidance_scale=3.0, steps=10):
    return GuidedLatentSampler(
        latent_space,
        SchedulerSettings(),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        progress=False,
        guidance_interval=interval,
    )


def test_guidance_interval_guides_only_the_steps_whose_noise_level_is_inside(latent_space, unet):
    sampler = _interval_sampler(latent_space, (1.0, 10.0))
    sampler.scheduler.set_timesteps(10)
    alpha_bar = sampler.scheduler.alphas_cumprod
    sigmas = [float(((1 - alpha_bar[t]) / alpha_bar[t]).sqrt()) for t in sampler.scheduler.timesteps]
    inside = [1.0 < s <= 10.0 for s in sigmas]
    assert 0 < sum(inside) < 10  # the default schedule's 10 steps span sigma ~0.04 to ~100: some in, some out
    recorder = CallRecorder(unet)
    cond, uncond = _contexts(3)
    sampler(_noise([0, 1, 2]), recorder, context=cond, uncond_context=uncond)
    assert recorder.batch_sizes == [6 if guided else 3 for guided in inside]
    for guided, context in zip(inside, recorder.contexts, strict=True):  # outside: the conditional branch alone
        torch.testing.assert_close(context, torch.cat([uncond, cond]) if guided else cond)
    assert sampler.guided_steps() == sum(inside)


def test_guidance_interval_that_covers_every_step_or_none_matches_full_guidance_or_conditional(latent_space, unet):
    noise, (cond, uncond) = _noise([5, 6]), _contexts()
    full = _interval_sampler(latent_space, None)(noise, unet, context=cond, uncond_context=uncond)
    everywhere = _interval_sampler(latent_space, (0.0, 1e6))(noise, unet, context=cond, uncond_context=uncond)
    nowhere = _interval_sampler(latent_space, (1e5, 1e6))(noise, unet, context=cond, uncond_context=uncond)
    conditional = _interval_sampler(latent_space, None, guidance_scale=1.0)(
        noise, unet, context=cond, uncond_context=uncond
    )
    torch.testing.assert_close(everywhere, full)
    torch.testing.assert_close(nowhere, conditional)
    assert not torch.allclose(full, conditional)


def test_guidance_interval_leaves_unconditional_sampling_unconditional(latent_space, unet):
    recorder = CallRecorder(unet)
    cond, uncond = _contexts(2)
    sampler = _interval_sampler(latent_space, (1.0, 10.0), guidance_scale=0.0)
    sampler(_noise([0, 1]), recorder, context=cond, uncond_context=uncond)
    assert recorder.batch_sizes == [2] * 10 and sampler.guided_steps() == 0
    assert all(torch.equal(c, uncond) for c in recorder.contexts)


@pytest.mark.parametrize("interval", [(5.0, 1.0), (2.0, 2.0), (-1.0, 3.0), (1.0,), "1,5"])
def test_bad_guidance_interval_is_refused_with_its_rule(latent_space, interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        _interval_sampler(latent_space, interval)


# torch.compile -----------------------------------------------------------------------------------------


def test_compiled_controlnet_sampling_gives_the_eager_images_and_compiles_each_network_once(latent_space):
    """--compile on the ControlNet sampler: ControlNet and frozen UNet compiled once, each batch reuses the graphs."""
    import torch._dynamo

    unet = freeze(make_unet())
    controlnet = _steering_controlnet(unet).eval()
    latents, context, cond = _inputs()

    def sampler(compile):
        return _controlnet_sampler(latent_space, unet, num_inference_steps=2, guidance_scale=1.0, compile=compile)

    eager = sampler(False)(latents, controlnet, context=context, uncond_context=context, controlnet_cond=cond)
    torch._dynamo.reset()
    compiled = sampler(True)
    frames = torch._dynamo.utils.counters["stats"]
    first = compiled(latents, controlnet, context=context, uncond_context=context, controlnet_cond=cond)
    compiled_frames = frames["unique_graphs"]
    second = compiled(latents, controlnet, context=context, uncond_context=context, controlnet_cond=cond.flip(0))
    torch.testing.assert_close(first, eager, atol=1e-4, rtol=1e-4)
    assert frames["unique_graphs"] == compiled_frames, "the second batch reuses the compiled graphs"
    assert compiled.compiled(controlnet) is compiled.compiled(controlnet) is not controlnet
    assert not isinstance(controlnet.controlnet_cond_embedding, torch.nn.Identity), "the embedding is restored"
    assert not torch.allclose(first, second)


def test_replaced_copies_with_checked_changes_and_leaves_the_original_alone(latent_space):
    sampler = _interval_sampler(latent_space, None, steps=10)
    fast = sampler.replaced(precision="bf16", guidance_interval=[1.0, 10.0], num_inference_steps=20, compile=True)
    assert (fast.precision, fast.guidance_interval, fast.num_inference_steps, fast.compile) == (
        "bf16",
        (1.0, 10.0),
        20,
        True,
    )
    assert (sampler.precision, sampler.guidance_interval, sampler.num_inference_steps, sampler.compile) == (
        "fp32",
        None,
        10,
        False,
    )
    assert fast.scheduler is not sampler.scheduler and fast.latent_space is sampler.latent_space
    fast.scheduler.set_timesteps(20)
    sampler.scheduler.set_timesteps(10)
    assert len(fast.scheduler.timesteps) == 20, "each copy keeps its own timesteps"
    with pytest.raises(ValueError, match="guidance_interval"):
        sampler.replaced(guidance_interval=[3.0, 1.0])
    with pytest.raises(ValueError, match="Unknown precision"):
        sampler.replaced(precision="fp8")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.replaced(num_inference_steps=0)
    with pytest.raises(ValueError, match=r"Unknown sampler settings \['guidance', 'scheduler_name'\]"):
        sampler.replaced(guidance=2.0, scheduler_name="ddpm")
    with pytest.raises(ValueError, match="conditioning_scale"):  # a ControlNet knob, not this sampler's
        sampler.replaced(conditioning_scale=2.0)
