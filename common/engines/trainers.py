"""Ignite trainers beyond MONAI's: the AutoencoderKL recipe of the latent diffusion papers."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import AdversarialTrainer
from monai.utils import AdversarialKeys, CommonKeys


class AutoencoderKLTrainer(AdversarialTrainer):
    """MONAI ``AdversarialTrainer`` with the AutoencoderKL recipe of the latent diffusion papers.

    Generator loss per iteration::

        L1(recon, x) + kl_weight * KL + perceptual_weight * LPIPS(recon, x) + adversarial_weight * G_adv

    The adversarial term and the discriminator updates start at epoch ``adversarial_start_epoch``
    (1-based, as Ignite counts): a warm-up that keeps an untrained discriminator from destabilising the
    early reconstruction. The core trainer's ``g_inferer`` cannot carry the latent mean and sigma that
    KL needs, hence this subclass; construction and events are the core ones. Checkpoints hold the networks, optimisers and the trainer
    state, plus the AMP scalers through ``common.engines.resume.GradScalerState`` (MONAI's state dict leaves them out).

    Args:
        perceptual_loss: e.g. ``monai.losses.PerceptualLoss``, or ``None`` when its weights are not local.
        kl_weight, perceptual_weight, adversarial_weight: loss weights (reference: 1e-8, 0.002, 0.005).
        adversarial_start_epoch: first epoch with the adversarial term.
        other arguments: as ``monai.engines.AdversarialTrainer``; ``g_loss_function`` / ``d_loss_function``
            take discriminator logits (``PatchAdversarialLoss`` wrappers from :func:`generator_loss` and
            :func:`discriminator_loss`), ``recon_loss_function`` takes ``(recon, image)``.
    """

    def __init__(
        self,
        *args: Any,
        perceptual_loss: torch.nn.Module | None = None,
        kl_weight: float = 1e-8,
        perceptual_weight: float = 0.002,
        adversarial_weight: float = 0.005,
        adversarial_start_epoch: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.perceptual_loss = perceptual_loss
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.adversarial_weight = adversarial_weight
        self.adversarial_start_epoch = adversarial_start_epoch

    def _complete_state_dict_user_keys(self) -> None:
        # The core trainer adds the networks and optimisers themselves to its state dict, which pickles whole
        # modules into checkpoints (unloadable with weights_only=True). Checkpoints save them separately.
        return None

    def adversarial_active(self) -> bool:
        return self.adversarial_weight > 0 and self.state.epoch >= self.adversarial_start_epoch

    @staticmethod
    def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma) || N(0, 1)) summed over latent dims, averaged over the batch."""
        kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
        return kl.flatten(1).sum(1).mean()

    def _iteration(self, engine: AutoencoderKLTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        state = engine.state
        adversarial = engine.adversarial_active()
        use_amp = engine.amp and state.g_scaler is not None
        autocast = torch.autocast("cuda", **engine.amp_kwargs) if use_amp else torch.autocast("cpu", enabled=False)

        state.g_network.train()
        state.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast:
            recon, z_mu, z_sigma = state.g_network(images)
            recon_loss = state.recon_loss_function(recon.float(), images).mean()
            kl_loss = engine.kl_divergence(z_mu.float(), z_sigma.float())
            g_loss = recon_loss + engine.kl_weight * kl_loss
            perceptual = torch.zeros((), device=images.device)
            if engine.perceptual_loss is not None and engine.perceptual_weight > 0:
                perceptual = engine.perceptual_loss(recon.float(), images).mean()
                g_loss = g_loss + engine.perceptual_weight * perceptual
            g_adv = torch.zeros((), device=images.device)
            if adversarial:
                g_adv = state.g_loss_function(state.d_network(recon.contiguous().float()))
                g_loss = g_loss + engine.adversarial_weight * g_adv
        _step(g_loss, state.g_optimizer, state.g_scaler if use_amp else None)

        d_loss = torch.zeros((), device=images.device)
        if adversarial:
            state.d_network.train()
            state.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with autocast:
                fake_logits = state.d_network(recon.detach().contiguous().float())
                real_logits = state.d_network(images.contiguous().detach())
                d_loss = engine.adversarial_weight * state.d_loss_function(real_logits, fake_logits)
            _step(d_loss, state.d_optimizer, state.d_scaler if use_amp else None)

        return {
            CommonKeys.IMAGE: images,
            CommonKeys.LABEL: images,
            CommonKeys.PRED: recon.detach(),
            CommonKeys.LOSS: g_loss.detach(),
            AdversarialKeys.RECONSTRUCTION_LOSS: recon_loss.detach(),
            AdversarialKeys.GENERATOR_LOSS: g_adv.detach(),
            AdversarialKeys.DISCRIMINATOR_LOSS: d_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "perceptual_loss": perceptual.detach(),
        }


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any | None) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
