"""common.diffusion.prior_sampling: the prior's training batches, a short training run and guided sampling."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from common.diffusion.prior_sampling import PriorPrepareBatch, PriorSampler
from common.diffusion.schedules import SchedulerSettings
from common.networks.prior import DiffusionPrior, EmbeddingStandardizer

D_EMB, D_TEXT, TOKENS = 16, 12, 4
SETTINGS = {"schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 2e-2, "prediction_type": "sample"}


def _settings() -> SchedulerSettings:
    return SchedulerSettings(num_train_timesteps=1000, **SETTINGS)


def _prior(seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    return DiffusionPrior(D_EMB, D_TEXT, width=32, num_layers=2, num_heads=4, max_text_tokens=TOKENS)


class ToyCaptions:
    """Captions whose image embedding is a fixed linear map of their text embedding, plus a little noise.

    The image embeddings are far from zero mean and unit variance, so training needs the standardiser.
    """

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image_map = torch.randn(D_EMB, D_EMB, generator=g) / D_EMB**0.5
        self.token_map = torch.randn(D_EMB, TOKENS * D_TEXT, generator=g) / D_EMB**0.5
        self.scale = torch.linspace(0.5, 3.0, D_EMB)
        self.offset = torch.randn(D_EMB, generator=g) * 4

    def true_image_embedding(self, text_embedding: torch.Tensor) -> torch.Tensor:
        return (text_embedding @ self.image_map.T) * self.scale + self.offset

    def batch(self, size: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        text = torch.randn(size, D_EMB, generator=g)
        image = self.true_image_embedding(text) + 0.05 * torch.randn(size, D_EMB, generator=g)
        tokens = (text @ self.token_map).reshape(size, TOKENS, D_TEXT)
        return {"text_embedding": text, "text_tokens": tokens, "image_embedding": image}


def _prepare(standardizer: EmbeddingStandardizer, **kwargs) -> PriorPrepareBatch:
    return PriorPrepareBatch(standardizer, _settings().build("ddpm"), **kwargs)


# PriorPrepareBatch ------------------------------------------------------------------------------------


def test_prepare_batch_returns_noisy_input_clean_target_and_the_prior_arguments():
    batch = ToyCaptions().batch(8, seed=1)
    batch["text_mask"] = torch.ones(8, TOKENS, dtype=torch.bool)
    standardizer = EmbeddingStandardizer(D_EMB).fit(batch["image_embedding"])
    torch.manual_seed(0)
    noisy, target, args, kwargs = _prepare(standardizer, text_mask_key="text_mask")(batch)

    torch.testing.assert_close(target, standardizer.standardize(batch["image_embedding"]))
    assert noisy.shape == target.shape == (8, D_EMB) and args == ()
    assert not torch.allclose(noisy, target)
    assert set(kwargs) == {"timesteps", "drop_text", "text_embedding", "text_tokens", "text_mask"}
    assert kwargs["timesteps"].shape == (8,) and kwargs["timesteps"].dtype == torch.int64
    assert 0 <= kwargs["timesteps"].min() and kwargs["timesteps"].max() < 1000
    assert kwargs["drop_text"].shape == (8,) and kwargs["drop_text"].dtype == torch.bool
    assert torch.equal(kwargs["text_tokens"], batch["text_tokens"])
    # what the engine's SimpleInferer does with it
    assert _prior()(noisy, *args, **kwargs).shape == (8, D_EMB)


def test_prepare_batch_is_seeded_by_the_global_rng_and_omits_absent_text_inputs():
    batch = ToyCaptions().batch(8, seed=1)
    prepare = _prepare(EmbeddingStandardizer(D_EMB).fit(batch["image_embedding"]), text_tokens_key=None)
    torch.manual_seed(3)
    first = prepare(batch)
    torch.manual_seed(3)
    second = prepare(batch)
    torch.testing.assert_close(first[0], second[0])
    assert torch.equal(first[3]["drop_text"], second[3]["drop_text"])
    assert set(first[3]) == {"timesteps", "drop_text", "text_embedding"}


@pytest.mark.parametrize("drop_prob", [0.0, 0.1, 0.5])
def test_prepare_batch_drops_about_drop_prob_of_the_captions(drop_prob):
    batch = ToyCaptions().batch(20000, seed=2)
    prepare = _prepare(EmbeddingStandardizer(D_EMB).fit(batch["image_embedding"]), drop_prob=drop_prob)
    torch.manual_seed(0)
    dropped = prepare(batch)[3]["drop_text"].float().mean().item()
    assert dropped == pytest.approx(drop_prob, abs=0.01)  # 3+ standard deviations at n = 20000


def test_prepare_batch_refuses_other_prediction_types_and_bad_probabilities():
    standardizer = EmbeddingStandardizer(D_EMB)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        PriorPrepareBatch(standardizer, SchedulerSettings(prediction_type="epsilon").build())
    with pytest.raises(ValueError, match="drop_prob"):
        _prepare(standardizer, drop_prob=1.5)


# Training and sampling --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A prior trained 200 iterations on :class:`ToyCaptions` with MONAI's SupervisedTrainer; its losses."""
    data = ToyCaptions()
    batches = [data.batch(64, seed=s) for s in range(20)]
    prior = _prior()
    prior.standardizer.fit(torch.cat([b["image_embedding"] for b in batches]))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=10,
        train_data_loader=batches,
        network=prior,
        optimizer=torch.optim.Adam(prior.parameters(), lr=2e-3),
        loss_function=torch.nn.MSELoss(),
        prepare_batch=_prepare(prior.standardizer),
        decollate=False,
    )
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    torch.manual_seed(0)
    trainer.run()
    return data, prior.eval(), losses


def _sample(prior, data, guidance_scale, seed=0, n=64):
    """Samples for ``n`` held-out captions, and their true image embeddings."""
    test = data.batch(n, seed=1000)
    noise = torch.randn(n, D_EMB, generator=torch.Generator().manual_seed(seed))
    sampler = PriorSampler(_settings(), num_inference_steps=20, guidance_scale=guidance_scale)
    samples = sampler(noise, prior, test["text_embedding"], test["text_tokens"])
    return samples, data.true_image_embedding(test["text_embedding"])


def _centred_cosine(samples, truth, data):
    # the embeddings share a large offset, which alone would make any two of them similar
    return torch.nn.functional.cosine_similarity(samples - data.offset, truth - data.offset).mean().item()


def test_training_reduces_the_loss(trained):
    _, _, losses = trained
    assert len(losses) == 200
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


def test_guided_samples_recover_the_image_embeddings_of_their_captions(trained):
    data, prior, _ = trained
    samples, truth = _sample(prior, data, guidance_scale=2.0)
    assert samples.shape == (64, D_EMB)
    guided = _centred_cosine(samples, truth, data)
    unconditional = _centred_cosine(_sample(prior, data, guidance_scale=0.0)[0], truth, data)
    shuffled = _centred_cosine(samples, truth.roll(1, 0), data)
    assert guided > 0.9, guided
    assert unconditional < 0.5 and shuffled < 0.5, (unconditional, shuffled)


def test_guidance_changes_samples_and_a_seed_fixes_them(trained):
    data, prior, _ = trained
    guided, _ = _sample(prior, data, guidance_scale=3.0, n=8)
    torch.testing.assert_close(_sample(prior, data, guidance_scale=3.0, n=8)[0], guided)
    assert not torch.allclose(_sample(prior, data, guidance_scale=0.0, n=8)[0], guided)
    assert not torch.allclose(_sample(prior, data, guidance_scale=3.0, n=8, seed=1)[0], guided)


def test_stochastic_ddim_is_reproducible_per_sample_generator(trained):
    data, prior, _ = trained
    test = data.batch(4, seed=7)
    noise = torch.randn(4, D_EMB, generator=torch.Generator().manual_seed(0))
    sampler = PriorSampler(_settings(), num_inference_steps=10, guidance_scale=2.0, eta=1.0)

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sampler(noise, prior, test["text_embedding"], test["text_tokens"], generator=generators)

    first = run([0, 1, 2, 3])
    torch.testing.assert_close(run([0, 1, 2, 3]), first)
    changed = run([0, 1, 2, 9])
    torch.testing.assert_close(changed[:3], first[:3])  # a sample depends on its own generator only
    assert not torch.allclose(changed[3], first[3])


def test_sampling_an_unfitted_prior_is_refused():
    data = ToyCaptions()
    test = data.batch(2, seed=0)
    with pytest.raises(RuntimeError, match="standardiser"):
        PriorSampler(_settings(), num_inference_steps=2)(torch.randn(2, D_EMB), _prior(), test["text_embedding"])


# CaptionPriorPrepareBatch / caption_condition ------------------------------------------------------------


def _small_clip():
    from common.networks.clip_model import ClipEncoder, build_small_clip
    from tests.conftest import TOKENIZER_DIR, _cached_tokenizer

    clip = build_small_clip(image_size=32, patch_size=8, vision_width=16, text_width=12, heads=2, projection_dim=D_EMB)
    return ClipEncoder(clip, _cached_tokenizer(str(TOKENIZER_DIR))).eval().requires_grad_(False)


def test_caption_batches_get_the_clip_condition_the_pipeline_uses():
    """Training's text condition is caption_condition's, which UnclipPipeline samples with."""
    from common.diffusion.prior_sampling import CaptionPriorPrepareBatch, caption_condition

    clip = _small_clip()
    captions = ["T1-weighted brain MRI, axial slice at z=+11 mm", "large lateral ventricles", ""]
    embeddings = torch.randn(3, D_EMB) * 2 + 1
    standardizer = EmbeddingStandardizer(D_EMB).fit(embeddings)
    prepare = CaptionPriorPrepareBatch(clip, standardizer, _settings().build("ddpm"), drop_prob=0.0)
    torch.manual_seed(0)
    noisy, x0, args, kwargs = prepare({"image_embedding": embeddings, "caption": captions})
    condition = caption_condition(clip, captions)
    assert set(condition) == {"text_embedding", "text_tokens"} and args == ()
    assert torch.equal(kwargs["text_embedding"], condition["text_embedding"])
    assert torch.equal(kwargs["text_tokens"], condition["text_tokens"]) and kwargs["text_tokens"].shape == (3, 77, 12)
    assert "text_mask" not in kwargs and not kwargs["drop_text"].any()
    torch.testing.assert_close(x0, standardizer.standardize(embeddings))
    assert torch.allclose(condition["text_embedding"].norm(dim=-1), torch.ones(3))

    masked = CaptionPriorPrepareBatch(clip, standardizer, _settings().build("ddpm"), use_text_mask=True)
    _, _, _, kwargs = masked({"image_embedding": embeddings, "caption": captions})
    assert kwargs["text_mask"].shape == (3, 77) and kwargs["text_mask"][2].sum() == 2  # start and end tokens
    bare = CaptionPriorPrepareBatch(clip, standardizer, _settings().build("ddpm"), use_text_tokens=False)
    assert set(bare({"image_embedding": embeddings, "caption": captions})[3]) == {
        "timesteps",
        "drop_text",
        "text_embedding",
    }
    with pytest.raises(TypeError, match="one string"):
        prepare({"image_embedding": embeddings[:1], "caption": "one caption"})
    with pytest.raises(ValueError, match="needs `use_text_tokens`"):
        CaptionPriorPrepareBatch(
            clip, standardizer, _settings().build("ddpm"), use_text_tokens=False, use_text_mask=True
        )


def test_standardizer_handler_fits_on_the_training_embeddings_unless_resumed():
    from common.engines.handlers import EmbeddingStandardizerHandler

    items = [{"image_embedding": torch.randn(D_EMB) * 3 + 2} for _ in range(10)]
    standardizer = EmbeddingStandardizer(D_EMB)
    EmbeddingStandardizerHandler(standardizer, items)()
    stacked = torch.stack([item["image_embedding"] for item in items])
    torch.testing.assert_close(standardizer.mean, stacked.mean(0))
    resumed = EmbeddingStandardizer(D_EMB).fit(torch.randn(4, D_EMB))
    before = resumed.mean.clone()
    EmbeddingStandardizerHandler(resumed, items)()
    assert torch.equal(resumed.mean, before), "a restored standardiser is kept"
    with pytest.raises(KeyError, match="cache the CLIP image embeddings"):
        EmbeddingStandardizerHandler(EmbeddingStandardizer(D_EMB), [{"caption": "x"}])()
