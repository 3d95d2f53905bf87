"""common.diffusion.schedules: the noise-schedule settings stored with diffusion weights."""

from __future__ import annotations

import math

import pytest
import torch

from common.diffusion.schedules import SchedulerSettings
from common.io.weights import load_weights


def test_default_settings_are_the_reference_recipe():
    assert SchedulerSettings().state_dict() == {
        "num_train_timesteps": 1000,
        "schedule": "scaled_linear_beta",
        "beta_start": 0.0015,
        "beta_end": 0.0205,
        "prediction_type": "v_prediction",
    }


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_build_scheduler(kind, prediction_type):
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    settings = SchedulerSettings(num_train_timesteps=500, beta_end=0.02, prediction_type=prediction_type)
    scheduler = settings.build(kind)
    assert isinstance(scheduler, {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind])
    assert scheduler.clip_sample is False
    assert scheduler.prediction_type == prediction_type
    assert scheduler.num_train_timesteps == 500
    # scaled_linear_beta: betas are linear in sqrt space between beta_start and beta_end.
    assert scheduler.betas[0].item() == pytest.approx(0.0015, rel=1e-5)
    assert scheduler.betas[-1].item() == pytest.approx(0.02, rel=1e-5)


def test_build_unknown_scheduler_raises():
    with pytest.raises(ValueError, match="pndm"):
        SchedulerSettings().build("pndm")


def test_from_state_round_trip(tmp_path):
    original = SchedulerSettings(num_train_timesteps=200, beta_start=0.001, beta_end=0.01, prediction_type="epsilon")
    torch.save({"scheduler": original.state_dict()}, tmp_path / "weights.pt")
    restored = SchedulerSettings.from_state(load_weights(tmp_path / "weights.pt")["scheduler"])
    assert restored.state_dict() == original.state_dict()
    assert restored.build("ddim").num_train_timesteps == 200


def test_partial_state_keeps_defaults_for_missing_keys():
    settings = SchedulerSettings.from_state({"prediction_type": "epsilon"})
    assert settings.values["prediction_type"] == "epsilon"
    assert settings.values["num_train_timesteps"] == 1000


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="clip_sample"):
        SchedulerSettings.from_state({"num_train_timesteps": 1000, "clip_sample": True})


def test_state_dict_is_a_copy():
    settings = SchedulerSettings()
    state = settings.state_dict()
    state["num_train_timesteps"] = 1
    assert settings.values["num_train_timesteps"] == 1000
    assert math.isclose(settings.values["beta_end"], 0.0205)


def test_cosine_schedule_builds_without_a_beta_range():
    from common.diffusion.schedules import SchedulerSettings

    scheduler = SchedulerSettings(schedule="cosine", prediction_type="sample").build("ddpm")
    assert scheduler.prediction_type == "sample" and scheduler.betas[0] < scheduler.betas[-1]
