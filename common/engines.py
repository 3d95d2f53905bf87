"""Ignite engines and ``prepare_batch`` callables for autoencoder and latent diffusion training/sampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import AdversarialTrainer, DiffusionPrepareBatch, PrepareBatch
from monai.inferers import Inferer
from monai.utils import AdversarialKeys, CommonKeys

from common.latent import ScaledLatentSpace
from common.text.encoder import CLIPPromptEncoder


class AutoencoderKLTrainer(AdversarialTrainer):
    """MONAI ``AdversarialTrainer`` with the AutoencoderKL recipe of the latent diffusion papers.

    Generator loss per iteration::

        L1(recon, x) + kl_weight * KL + perceptual_weight * LPIPS(recon, x) + adversarial_weight * G_adv

    The adversarial term and the discriminator updates start at epoch ``adversarial_start_epoch``
    (1-based, as Ignite counts): a warm-up that keeps an untrained discriminator from destabilising the
    early reconstruction. The core trainer's ``g_inferer`` cannot carry the latent mean and sigma that
    KL needs, hence this subclass; construction, checkpointable state (``g_network``, ``d_network``,
    both optimisers and scalers) and events are the core ones.

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


class AutoencoderPrepareBatch(PrepareBatch):
    """Batch dict -> ``(image, image)``: the autoencoder reconstructs its input."""

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return images, images


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Batch dict -> noised-latent training example for a text-conditioned latent diffusion UNet.

    Images ``(B, C, H, W)`` are encoded into scaled latents ``(B, c, H/f, W/f)`` by the frozen
    autoencoder here, not inside the inferer, because the v-prediction target needs the latent.
    Prompts (``B`` strings, already dropped to ``""`` by ``PromptDropoutd`` where chosen) become the
    cross-attention context ``(B, 77, D)``.

    Returns ``(latents, target, (), {"noise", "timesteps", "condition"})`` for ``DiffusionInferer``;
    the target follows the scheduler's ``prediction_type`` (``v_prediction``, ``epsilon`` or ``sample``).
    """

    def __init__(
        self,
        latent_space: ScaledLatentSpace,
        prompt_encoder: CLIPPromptEncoder,
        scheduler: torch.nn.Module,
        image_key: str = "image",
        prompt_key: str = "caption",
    ) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        self.latent_space = latent_space
        self.prompt_encoder = prompt_encoder
        self.scheduler = scheduler
        self.image_key = image_key
        self.prompt_key = prompt_key

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.prediction_type
        if kind == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        if kind == "sample":
            return images
        return noise

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        latents = self.latent_space.encode(images)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        target = self.get_target(latents, noise, timesteps)
        context = self.prompt_encoder(list(batchdata[self.prompt_key]))
        return latents, target, (), {"noise": noise, "timesteps": timesteps, "condition": context}


class PromptSamplingPrepareBatch(PrepareBatch):
    """Batch of sample requests -> ``(noise, label, (), {"context", "uncond_context", "generator", ...})``.

    ``noise`` ``(B, c, h, w)`` comes from the ``SeededNoised`` transform; the unconditional context is
    the embedding of the empty prompt, which is what training's prompt dropout taught the model.
    ``label`` is ``batch[label_key]`` (e.g. the true image when evaluating a translation) or ``None``.
    ``condition_keys`` maps extra sampler arguments to batch keys, e.g. ``{"controlnet_cond": "flair"}``.
    """

    def __init__(
        self,
        prompt_encoder: CLIPPromptEncoder,
        noise_key: str = "noise",
        prompt_key: str = "prompt",
        seed_key: str = "seed",
        empty_prompt: str = "",
        label_key: str | None = None,
        condition_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.prompt_encoder = prompt_encoder
        self.seed_key = seed_key
        self.noise_key = noise_key
        self.prompt_key = prompt_key
        self.empty_prompt = empty_prompt
        self.label_key = label_key
        self.condition_keys = dict(condition_keys or {})

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        noise = batchdata[self.noise_key].to(device=device, non_blocking=non_blocking, **kwargs)
        prompts = list(batchdata[self.prompt_key])
        context = self.prompt_encoder(prompts).to(device)
        uncond = self.prompt_encoder([self.empty_prompt] * len(prompts)).to(device)
        # Only DDPM draws noise while sampling: one generator per sample keeps an image a function of its seed.
        generator = [torch.Generator(device=noise.device).manual_seed(int(s)) for s in batchdata[self.seed_key]]
        label = None
        if self.label_key is not None:
            label = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        extra = {
            name: batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)
            for name, key in self.condition_keys.items()
        }
        return noise, label, (), {"context": context, "uncond_context": uncond, "generator": generator, **extra}


class ReconstructionInferer(Inferer):
    """Run an ``AutoencoderKL`` and keep only the reconstruction ``(B, C, H, W)`` (not ``z_mu``, ``z_sigma``)."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return network(inputs, *args, **kwargs)[0]
