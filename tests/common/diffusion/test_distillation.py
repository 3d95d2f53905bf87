"""common.diffusion.distillation: the teacher's guided target, the student's sampling, and which weights sample."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer

from common.diffusion.distillation import (
    DISTILLATION_KEY,
    DistillationRecord,
    GuidanceDistillationPrepareBatch,
    choose_distilled_weights,
    distilled_scale,
)
from common.diffusion.sampling import GuidedLatentSampler
from common.diffusion.schedules import SchedulerSettings
from tests.conftest import CONTEXT_DIM, LATENT, CallRecorder, make_unet

CAPTIONS = ["T1-weighted image of a brain with large ventricles.", ""]


def _prepare(latent_space, prompt_encoder, teacher, scale=3.0):
    scheduler = SchedulerSettings(num_train_timesteps=100, prediction_type="v_prediction").build("ddpm")
    return GuidanceDistillationPrepareBatch(latent_space, prompt_encoder, scheduler, teacher, guidance_scale=scale)


def test_target_is_the_teachers_guided_output_at_the_noised_latent(latent_space, prompt_encoder, images):
    """The student is asked about the very ``x_t`` the trainer's ``DiffusionInferer`` builds, and its target is
    ``uncond + s * (cond - uncond)`` of the teacher there; a dropped caption's target is the unconditional output."""
    teacher = make_unet(seed=1)
    prepare = _prepare(latent_space, prompt_encoder, teacher, scale=3.0)
    latents, target, args, kwargs = prepare({"image": images, "caption": CAPTIONS}, device="cpu")
    noisy = prepare.scheduler.add_noise(latents, kwargs["noise"], kwargs["timesteps"])
    t = kwargs["timesteps"]
    with torch.no_grad():
        cond = teacher(noisy, timesteps=t, context=prompt_encoder(CAPTIONS))
        uncond = teacher(noisy, timesteps=t, context=prompt_encoder(["", ""]))
    torch.testing.assert_close(target, uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(target[1], uncond[1])  # empty caption: cond == uncond
    assert not torch.allclose(target[0], cond[0]), "guidance moved the target away from the conditional output"

    seen = []
    student = make_unet(seed=2)
    student.register_forward_pre_hook(lambda module, a, kw: seen.append(kw["x"]), with_kwargs=True)
    DiffusionInferer(prepare.scheduler)(latents, student, *args, **kwargs)
    torch.testing.assert_close(seen[0], noisy)


def test_the_teacher_is_frozen_and_only_the_student_learns(latent_space, prompt_encoder, images):
    teacher, student = make_unet(seed=1), make_unet(seed=1)
    prepare = _prepare(latent_space, prompt_encoder, teacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    latents, target, args, kwargs = prepare({"image": images, "caption": CAPTIONS})
    assert not target.requires_grad
    student.train()
    loss = torch.nn.functional.mse_loss(DiffusionInferer(prepare.scheduler)(latents, student, *args, **kwargs), target)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("scale", [1.0, 0.0, -2.0, True, "3"])
def test_a_scale_that_needs_no_distillation_is_refused(latent_space, prompt_encoder, scale):
    with pytest.raises(ValueError, match="distilled guidance scale must be a number above 1"):
        _prepare(latent_space, prompt_encoder, make_unet(), scale=scale)


def _sampler(latent_space, guidance_scale=3.0, **kwargs):
    return GuidedLatentSampler(
        latent_space,
        SchedulerSettings(),
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        progress=False,
        **kwargs,
    )


def test_a_distilled_network_is_called_once_per_step_on_the_conditional_context(latent_space, unet):
    """Half the UNet work: one call of ``B`` per step, the caption's context, and the images a guidance-1 sampler
    would make with the same network (the student's conditional output is the guided one)."""
    noise = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.randn(3, 77, CONTEXT_DIM), torch.zeros(3, 77, CONTEXT_DIM)
    recorder = CallRecorder(unet)
    sampler = _sampler(latent_space, distilled_guidance=3.0)
    images = sampler(noise, recorder, context=cond, uncond_context=uncond)
    assert recorder.batch_sizes == [3] * 4
    assert all(torch.equal(c, cond) for c in recorder.contexts)
    assert sampler.guided_steps() == 0
    plain = _sampler(latent_space, guidance_scale=1.0)(noise, unet, context=cond, uncond_context=uncond)
    torch.testing.assert_close(images, plain)


@pytest.mark.parametrize(
    ("guidance", "interval"),
    [(5.0, None), (0.0, None), (3.0, (1.0, 10.0))],
)
def test_a_distilled_network_refuses_guidance_it_cannot_give(latent_space, guidance, interval):
    with pytest.raises(ValueError, match="guidance-distilled for guidance 3 .*--guidance_distillation False"):
        _sampler(latent_space, guidance_scale=guidance, guidance_interval=interval, distilled_guidance=3.0)
    sampler = _sampler(latent_space, distilled_guidance=3.0)
    with pytest.raises(ValueError, match="guidance-distilled"):
        sampler.replaced(guidance_scale=guidance, guidance_interval=interval)
    teacher_sampler = sampler.replaced(guidance_scale=guidance, guidance_interval=interval, distilled_guidance=None)
    assert teacher_sampler.distilled_guidance is None and sampler.distilled_guidance == 3.0


def _write_student(path, teacher, scale=3.0, student=None):
    student = student or make_unet(seed=5)
    record = DistillationRecord(teacher, scale).state_dict()
    torch.save({"unet": student.state_dict(), DISTILLATION_KEY: record}, path)
    return path


def _choose(path, mode, guidance, teacher, interval=None):
    return choose_distilled_weights(path, mode, guidance, interval, {"unet": teacher.state_dict()}, "teacher.pt")


def test_auto_takes_the_student_only_for_the_guidance_and_teacher_it_learned(tmp_path, caplog):
    teacher = make_unet(seed=1)
    path = _write_student(tmp_path / "distilled.pt", teacher, scale=3.0)
    weights = _choose(path, "auto", 3.0, teacher)
    assert weights is not None and distilled_scale(weights) == 3.0
    assert distilled_scale({"unet": teacher.state_dict()}) is None
    assert _choose(path, True, 3, teacher) is not None
    assert _choose(path, "auto", 5.0, teacher) is None
    assert _choose(path, "auto", 0.0, teacher) is None
    assert _choose(path, "auto", 3.0, teacher, interval=(1.0, 10.0)) is None
    assert _choose(path, False, 3.0, teacher) is None
    assert _choose(tmp_path / "absent.pt", "auto", 3.0, teacher) is None
    # other diffusion weights given (--diffusion_path elsewhere): auto samples with them, and says why
    with caplog.at_level("INFO", logger="common.diffusion.distillation"):
        assert _choose(path, "auto", 3.0, make_unet(seed=3)) is None
    assert "distilled from another diffusion model than teacher.pt" in caplog.text


def test_insisting_on_a_student_that_cannot_serve_names_the_fix(tmp_path):
    teacher = make_unet(seed=1)
    path = _write_student(tmp_path / "distilled.pt", teacher, scale=3.0)
    with pytest.raises(ValueError, match="distilled at guidance 3, and 5 is asked.*--guidance_distillation auto"):
        _choose(path, True, 5.0, teacher)
    with pytest.raises(ValueError, match="a guidance interval is asked"):
        _choose(path, True, 3.0, teacher, interval=(1.0, 10.0))
    with pytest.raises(ValueError, match="distilled from another diffusion model than teacher.pt"):
        _choose(path, True, 3.0, make_unet(seed=3))
    with pytest.raises(FileNotFoundError, match="distill_guidance.json"):
        _choose(tmp_path / "absent.pt", True, 3.0, teacher)
    torch.save({"unet": teacher.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no 'guidance_distillation' record"):
        _choose(tmp_path / "plain.pt", True, 3.0, teacher)
    with pytest.raises(ValueError, match="'auto', True or False"):
        _choose(path, "yes", 3.0, teacher)
