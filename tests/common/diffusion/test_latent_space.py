"""common.diffusion.latent_space: the scaled latent space of a frozen autoencoder."""

from __future__ import annotations

import pytest
import torch

from common.diffusion.latent_space import ScaledLatentSpace
from common.io.weights import load_weights
from tests.conftest import IMAGE_SIZE, LATENT_CHANNELS, make_autoencoder


def _batches(n: int, batch_size: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand((batch_size, 1, *IMAGE_SIZE), generator=g)} for _ in range(n)]


def test_downsample_factor_follows_autoencoder_levels():
    assert ScaledLatentSpace(make_autoencoder((8, 8))).downsample_factor == 2
    assert ScaledLatentSpace(make_autoencoder((8, 8, 8))).downsample_factor == 4


def test_autoencoder_is_frozen_and_in_eval_mode(autoencoder):
    space = ScaledLatentSpace(autoencoder.train(), scale_factor=1.0)
    assert not space.autoencoder.training
    assert not any(p.requires_grad for p in space.autoencoder.parameters())


def test_encode_decode_shapes(latent_space, images):
    latents = latent_space.encode(images)
    assert latents.shape == (2, LATENT_CHANNELS, IMAGE_SIZE[0] // 2, IMAGE_SIZE[1] // 2)
    assert not latents.requires_grad
    decoded = latent_space.decode(latents)
    assert decoded.shape == images.shape


def test_encode_multiplies_and_decode_divides_by_scale_factor(autoencoder, images):
    # encode_stage_2_inputs draws z from the posterior N(mu, sigma): seed both draws alike.
    space = ScaledLatentSpace(autoencoder, scale_factor=0.25)
    torch.manual_seed(1)
    z = autoencoder.encode_stage_2_inputs(images)
    torch.manual_seed(1)
    torch.testing.assert_close(space.encode(images), 0.25 * z)
    torch.testing.assert_close(space.decode(0.25 * z), autoencoder.decode_stage_2_outputs(z))


@pytest.mark.parametrize("method", ["encode", "decode"])
def test_unknown_scale_factor_raises(autoencoder, images, method):
    space = ScaledLatentSpace(autoencoder)
    x = images if method == "encode" else torch.zeros(2, LATENT_CHANNELS, 8, 8)
    with pytest.raises(RuntimeError, match="scale factor"):
        getattr(space, method)(x)


def test_fit_scale_factor_is_one_over_std_of_latents(autoencoder):
    batches = _batches(3)
    space = ScaledLatentSpace(autoencoder)
    torch.manual_seed(1)  # latents are posterior samples: same seed, same draws
    fitted = space.fit_scale_factor(batches, image_key="image", device="cpu")
    torch.manual_seed(1)
    z = torch.cat([autoencoder.encode_stage_2_inputs(b["image"]) for b in batches]).double()
    expected = 1.0 / z.std(unbiased=False).item()
    assert fitted == pytest.approx(expected, rel=1e-6)
    assert space.scale_factor == fitted
    # The scaled latents of the fitting data have unit variance.
    torch.manual_seed(1)
    scaled = torch.cat([space.encode(b["image"]) for b in batches]).double()
    assert scaled.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)


def test_fit_scale_factor_respects_max_batches(autoencoder):
    batches = _batches(3)
    torch.manual_seed(1)
    first_only = ScaledLatentSpace(autoencoder).fit_scale_factor(batches[:1], "image", "cpu")
    torch.manual_seed(1)
    limited = ScaledLatentSpace(autoencoder).fit_scale_factor(batches, "image", "cpu", max_batches=1)
    assert limited == pytest.approx(first_only, rel=1e-12)


def test_fit_scale_factor_without_data_raises(autoencoder):
    with pytest.raises(ValueError, match="empty"):
        ScaledLatentSpace(autoencoder).fit_scale_factor([], "image", "cpu")


def test_fit_scale_factor_replaces_a_known_value(autoencoder):
    space = ScaledLatentSpace(autoencoder, scale_factor=123.0)
    assert space.fit_scale_factor(_batches(1), "image", "cpu") != 123.0


@pytest.mark.parametrize("value", [0.3, None])
def test_scale_factor_state_dict_round_trip(autoencoder, value, tmp_path):
    state = ScaledLatentSpace(autoencoder, scale_factor=value).state_dict()
    assert state == {"scale_factor": value}
    # It travels inside checkpoints that inference loads with weights_only=True.
    torch.save({"latent_space": state}, tmp_path / "weights.pt")
    loaded = load_weights(tmp_path / "weights.pt")["latent_space"]
    restored = ScaledLatentSpace(autoencoder, scale_factor=99.0)
    restored.load_state_dict(loaded)
    assert restored.scale_factor == value


def test_scale_factor_is_stored_as_float(autoencoder):
    space = ScaledLatentSpace(autoencoder, scale_factor=torch.tensor(0.5))
    assert isinstance(space.scale_factor, float)
    space.load_state_dict({"scale_factor": torch.tensor(2.0)})
    assert isinstance(space.scale_factor, float) and space.scale_factor == 2.0
