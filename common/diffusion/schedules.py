"""The noise schedule a diffusion model was trained with, stored beside its weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SchedulerSettings:
    """The noise schedule a diffusion model was trained with, saved beside its weights.

    Sampling must use the schedule, number of training steps and prediction type of training; storing
    them with the weights means inference configs build the scheduler from the checkpoint.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0205,
        prediction_type: str = "v_prediction",
    ) -> None:
        self.values: dict[str, Any] = {
            "num_train_timesteps": int(num_train_timesteps),
            "schedule": schedule,
            "beta_start": float(beta_start),
            "beta_end": float(beta_end),
            "prediction_type": prediction_type,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SchedulerSettings:
        """Settings as saved beside diffusion weights."""
        settings = cls()
        settings.load_state_dict(state)
        return settings

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - set(self.values)
        if unknown:
            raise ValueError(f"Unknown scheduler settings in checkpoint: {sorted(unknown)}.")
        self.values.update(state)

    def build(self, kind: str = "ddim"):
        """A MONAI scheduler (``"ddim"`` or ``"ddpm"``) with these settings and ``clip_sample=False``.

        Clipping to [-1, 1] is for pixel-space models; scaled latents are not bounded that way.
        """
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        kinds = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
        if kind not in kinds:
            raise ValueError(f"Unknown scheduler '{kind}': choose one of {sorted(kinds)}.")
        values = dict(self.values)
        if values["schedule"] == "cosine":  # MONAI's cosine schedule takes no beta range
            values.pop("beta_start")
            values.pop("beta_end")
        return kinds[kind](clip_sample=False, **values)
