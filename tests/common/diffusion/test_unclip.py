"""common.diffusion.unclip: decoder training batches (in MONAI's SupervisedTrainer), slerp, seeds and the pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer

from common.diffusion.latent_space import MU_KEY, SIGMA_KEY, ScaledLatentSpace
from common.diffusion.prior_sampling import PriorSampler
from common.diffusion.sampling import GuidedLatentSampler
from common.diffusion.schedules import SchedulerSettings
from common.diffusion.unclip import SEED_STREAMS, ImageEmbeddingPrepareBatch, UnclipPipeline, seed_streams, slerp
from common.networks.clip_model import ClipEncoder, build_small_clip
from common.networks.embedding_context import EmbeddingConditionedUNet, EmbeddingToContext
from common.networks.prior import DiffusionPrior
from tests.conftest import (
    CONTEXT_DIM,
    IMAGE_SIZE,
    LATENT,
    TOKENIZER_DIR,
    _cached_tokenizer,
    make_autoencoder,
    make_unet,
)

D_EMB, TOKENS = 16, 4
CLIP_ARGS = {
    "image_size": 16,
    "patch_size": 8,
    "vision_width": 16,
    "vision_layers": 1,
    "text_width": 32,
    "text_layers": 1,
    "heads": 2,
    "projection_dim": D_EMB,
}
PRIOR_SETTINGS = {"schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 2e-2, "prediction_type": "sample"}
PROMPTS = ["Axial T1 slice of a healthy brain.", "Large ventricles in an old brain."]


def _unit(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, D_EMB, generator=g), dim=-1)


def _decoder(seed: int = 0) -> EmbeddingConditionedUNet:
    unet = make_unet(seed)
    torch.manual_seed(seed)
    return EmbeddingConditionedUNet(unet, EmbeddingToContext(D_EMB, CONTEXT_DIM, TOKENS))


@pytest.fixture(scope="module")
def latent_space() -> ScaledLatentSpace:
    return ScaledLatentSpace(make_autoencoder(), scale_factor=0.5)


# ImageEmbeddingPrepareBatch ---------------------------------------------------------------------------------------


def test_prepare_batch_gives_the_v_prediction_example_with_embeddings_as_condition(latent_space, monkeypatch):
    scheduler = SchedulerSettings(prediction_type="v_prediction").build("ddpm")
    prepare = ImageEmbeddingPrepareBatch(latent_space, scheduler, drop_prob=0.0)
    images = torch.rand(2, 1, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    emb = _unit(2)
    fixed_noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(prepare, "get_noise", lambda latents: fixed_noise.clone())

    torch.manual_seed(0)
    latents, target, args, kwargs = prepare({"image": images, "image_embedding": emb}, device="cpu")
    torch.manual_seed(0)
    torch.testing.assert_close(latents, latent_space.encode(images))
    assert args == () and set(kwargs) == {"noise", "timesteps", "condition"}
    torch.testing.assert_close(target, scheduler.get_velocity(latents, fixed_noise, kwargs["timesteps"]))
    torch.testing.assert_close(kwargs["condition"], emb)  # drop_prob 0: nothing dropped


def test_prepare_batch_reads_cached_moments_and_drops_to_zero_rows(latent_space):
    scheduler = SchedulerSettings().build("ddpm")
    g = torch.Generator().manual_seed(1)
    batch = {
        MU_KEY: torch.randn(4, *LATENT, generator=g),
        SIGMA_KEY: torch.rand(4, *LATENT, generator=g),
        "emb": _unit(4)[:, None],  # (B, 1, D) as a collated cache may store it
    }
    latents, _, _, kwargs = ImageEmbeddingPrepareBatch(latent_space, scheduler, drop_prob=1.0, embedding_key="emb")(
        batch
    )
    assert latents.shape == (4, *LATENT)
    assert torch.equal(kwargs["condition"], torch.zeros(4, D_EMB))  # every one dropped to the null mark


@pytest.mark.parametrize("drop_prob", [0.1, 0.5])
def test_prepare_batch_drops_about_drop_prob_of_the_embeddings(latent_space, drop_prob):
    prepare = ImageEmbeddingPrepareBatch(latent_space, SchedulerSettings().build("ddpm"), drop_prob=drop_prob)
    emb = _unit(20000, seed=2)
    torch.manual_seed(0)
    condition = prepare.embeddings({"image_embedding": emb})
    dropped = (condition == 0).all(-1)
    assert dropped.float().mean().item() == pytest.approx(drop_prob, abs=0.012)
    torch.testing.assert_close(condition[~dropped], emb[~dropped])


def test_prepare_batch_refuses_bad_probabilities_and_missing_embeddings(latent_space):
    scheduler = SchedulerSettings().build("ddpm")
    with pytest.raises(ValueError, match="drop_prob"):
        ImageEmbeddingPrepareBatch(latent_space, scheduler, drop_prob=1.5)
    with pytest.raises(KeyError, match="precomputed CLIP image embeddings"):
        ImageEmbeddingPrepareBatch(latent_space, scheduler)({"image": torch.rand(1, 1, *IMAGE_SIZE)})


def test_decoder_trains_in_supervised_trainer_with_diffusion_inferer(latent_space):
    """Two iterations: finite losses, and gradients reach the projection and the null embedding."""
    settings = SchedulerSettings(num_train_timesteps=100)
    decoder = _decoder()
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(8, 1, *IMAGE_SIZE, generator=g), "image_embedding": _unit(8, s)} for s in (1, 2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=decoder,
        optimizer=torch.optim.Adam(decoder.parameters(), lr=1e-3),
        loss_function=torch.nn.MSELoss(),
        inferer=DiffusionInferer(settings.build("ddpm")),
        prepare_batch=ImageEmbeddingPrepareBatch(latent_space, settings.build("ddpm"), drop_prob=0.5),
        decollate=False,
    )
    seen: list[tuple[float, bool, bool]] = []

    def record(engine):
        def has_grad(p: torch.nn.Parameter) -> bool:
            return p.grad is not None and bool(p.grad.abs().sum() > 0)

        projection = decoder.projection
        loss = engine.state.output["loss"].item()
        seen.append((loss, has_grad(projection.proj.weight), has_grad(projection.null_embedding)))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    before = decoder.projection.proj.weight.detach().clone()
    torch.manual_seed(0)
    trainer.run()
    assert len(seen) == 2
    for loss, projection_grad, null_grad in seen:
        assert torch.isfinite(torch.tensor(loss)) and projection_grad and null_grad
    assert not torch.equal(before, decoder.projection.proj.weight)


# slerp and seeds ------------------------------------------------------------------------------------------------------


def test_slerp_endpoints_are_exact_and_the_path_stays_on_the_sphere():
    a, b = _unit(2, seed=4)
    path = slerp(a, b, [0.0, 0.25, 0.5, 1.0])
    assert path.shape == (4, D_EMB)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(4))
    angle = torch.acos((a * b).sum())
    torch.testing.assert_close(torch.acos((a * path[2]).sum()), angle / 2)  # constant speed
    torch.testing.assert_close(torch.acos((path[2] * b).sum()), angle / 2)
    assert slerp(a, b, 0.5).shape == (D_EMB,)
    assert torch.equal(slerp(a, b, 0), a) and torch.equal(slerp(a, b, 1), b)


def test_slerp_of_parallel_vectors_is_linear_and_of_opposite_ones_refused():
    a = _unit(1)[0]
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)
    with pytest.raises(ValueError, match="opposite"):
        slerp(a, -a, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        slerp(a, _unit(1, seed=1)[0], 1.5)


def test_seed_streams_are_deterministic_distinct_and_validated():
    first = seed_streams(7)
    assert first == seed_streams(7) and set(first) == set(SEED_STREAMS)
    assert len(set(first.values())) == len(SEED_STREAMS)
    assert set(seed_streams(8).values()).isdisjoint(first.values())
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="non-negative"):
            seed_streams(bad)  # type: ignore[arg-type]


# UnclipPipeline -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(latent_space) -> UnclipPipeline:
    clip = ClipEncoder(build_small_clip(**CLIP_ARGS, seed=0), _cached_tokenizer(str(TOKENIZER_DIR)))
    torch.manual_seed(0)
    prior = DiffusionPrior(D_EMB, CLIP_ARGS["text_width"], width=32, num_layers=1, num_heads=2)
    prior.standardizer.fit(_unit(64, seed=9))
    prior_settings = SchedulerSettings(num_train_timesteps=100, **PRIOR_SETTINGS)
    decoder_settings = SchedulerSettings(num_train_timesteps=100)
    return UnclipPipeline(
        clip,
        prior,
        PriorSampler(prior_settings, num_inference_steps=3, guidance_scale=2.0),
        _decoder(),
        GuidedLatentSampler(latent_space, decoder_settings, num_inference_steps=3, guidance_scale=3.0, progress=False),
        image_size=IMAGE_SIZE,
    )


def test_text_to_image_runs_the_whole_chain(pipeline):
    embeddings = pipeline.image_embedding_of(PROMPTS, [0, 1])
    assert embeddings.shape == (2, D_EMB)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    images = pipeline.text_to_image(PROMPTS, [0, 1])
    assert images.shape == (2, 1, *IMAGE_SIZE)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, pipeline.decode(embeddings, [0, 1]))


def test_a_seed_fixes_an_image_whatever_the_batch(pipeline):
    images = pipeline.text_to_image(PROMPTS, [0, 1])
    torch.testing.assert_close(pipeline.text_to_image(PROMPTS, [0, 1]), images, rtol=0, atol=0)
    torch.testing.assert_close(pipeline.text_to_image(PROMPTS[1:], [1]), images[1:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pipeline.text_to_image(PROMPTS, [0, 2])[1], images[1])


def test_prompts_and_guidance_change_the_images(pipeline):
    same_seed = pipeline.text_to_image(PROMPTS, [0, 0])
    assert not torch.allclose(same_seed[0], same_seed[1])  # different prompts
    unguided = pipeline.text_to_image(PROMPTS, [0, 0], decoder_guidance_scale=0.0)
    assert not torch.allclose(unguided, same_seed)  # decoder guidance 0 vs 3
    # decoder guidance 0 ignores the embedding: both prompts decode alike from the same noise
    torch.testing.assert_close(unguided[0], unguided[1], rtol=1e-4, atol=1e-5)
    emb = pipeline.image_embedding_of(PROMPTS, [0, 0])
    assert not torch.allclose(pipeline.image_embedding_of(PROMPTS, [0, 0], prior_guidance_scale=0.0), emb)
    assert pipeline.decoder_sampler.guidance_scale == 3.0 and pipeline.prior_sampler.guidance_scale == 2.0


def test_variations_decode_each_slice_embedding_from_fresh_noise(pipeline):
    slices = torch.rand(2, 1, *IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    variations = pipeline.variations(slices, seeds=[10, 20], num_variations=3)
    assert variations.shape == (6, 1, *IMAGE_SIZE)
    for i in range(2):
        group = variations[3 * i : 3 * i + 3].flatten(1)
        assert torch.cdist(group, group).fill_diagonal_(1.0).min() > 1e-4  # three distinct images
    first = pipeline.decode(pipeline.clip.encode_images(slices[1:]), [20])
    torch.testing.assert_close(variations[3], first[0], rtol=1e-4, atol=1e-5)


def test_interpolation_goes_from_one_prompts_image_to_the_others(pipeline):
    path = pipeline.interpolate(PROMPTS[0], PROMPTS[1], steps=4, seed=3)
    assert path.shape == (4, 1, *IMAGE_SIZE)
    torch.testing.assert_close(path[0], pipeline.text_to_image(PROMPTS[:1], [3])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(path[-1], pipeline.text_to_image(PROMPTS[1:], [3])[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(path[1], path[0]) and not torch.allclose(path[1], path[-1])
    with pytest.raises(ValueError, match="steps"):
        pipeline.interpolate(PROMPTS[0], PROMPTS[1], steps=1, seed=3)


def test_pipeline_refuses_mismatched_inputs(pipeline, latent_space):
    with pytest.raises(ValueError, match="one seed per sample"):
        pipeline.text_to_image(PROMPTS, [0])
    with pytest.raises(TypeError, match="sequence of strings"):
        pipeline.text_to_image(PROMPTS[0], [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Guidance scales"):
        pipeline.text_to_image(PROMPTS, [0, 1], decoder_guidance_scale=-1.0)
    with pytest.raises(ValueError, match="num_variations"):
        pipeline.variations(torch.rand(1, 1, *IMAGE_SIZE), [0], num_variations=0)
    other = EmbeddingConditionedUNet(make_unet(), EmbeddingToContext(D_EMB + 1, CONTEXT_DIM))
    with pytest.raises(ValueError, match="embedding size"):
        UnclipPipeline(
            pipeline.clip, pipeline.prior, pipeline.prior_sampler, other, pipeline.decoder_sampler, IMAGE_SIZE
        )


def test_stochastic_samplers_stay_a_function_of_the_seed(pipeline, latent_space):
    prior_sampler = PriorSampler(
        SchedulerSettings(num_train_timesteps=100, **PRIOR_SETTINGS), num_inference_steps=3, guidance_scale=2.0, eta=1.0
    )
    decoder_sampler = GuidedLatentSampler(
        latent_space, SchedulerSettings(num_train_timesteps=100), num_inference_steps=3, eta=1.0, progress=False
    )
    stochastic = UnclipPipeline(
        pipeline.clip, pipeline.prior, prior_sampler, pipeline.decoder, decoder_sampler, IMAGE_SIZE
    )
    images = stochastic.text_to_image(PROMPTS, [0, 1])
    torch.testing.assert_close(stochastic.text_to_image(PROMPTS, [0, 1]), images, rtol=0, atol=0)
    torch.testing.assert_close(stochastic.text_to_image(PROMPTS[1:], [1]), images[1:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(images, pipeline.text_to_image(PROMPTS, [0, 1]))  # eta 1 draws fresh step noise


# unCLIP inference requests -------------------------------------------------------------------------------------------


def _run_requests(pipeline, requests, batch_size: int = 2) -> torch.Tensor:
    """Images of ``requests`` made by MONAI's SupervisedEvaluator, as inference.json runs them."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator

    from common.diffusion.unclip_requests import UnclipRequestPrepareBatch

    loader = DataLoader(Dataset(requests), batch_size=batch_size, shuffle=False)
    images = []
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=pipeline.decoder,
        prepare_batch=UnclipRequestPrepareBatch(pipeline),
        inferer=pipeline.decoder_sampler,
        decollate=False,
    )
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: images.append(e.state.output["pred"].clamp(0, 1)))
    evaluator.run()
    return torch.cat(images)


def test_requests_of_each_mode_make_the_pipelines_images(pipeline):
    from common.data.condition_images import ConditionImage
    from common.diffusion.unclip_requests import unclip_requests

    text = unclip_requests(PROMPTS[0], num_samples=3, seed=4)
    assert [(r["mode"], r["seed"], r["index"]) for r in text] == [("text", 4, 0), ("text", 5, 1), ("text", 6, 2)]
    torch.testing.assert_close(
        _run_requests(pipeline, text), pipeline.text_to_image([PROMPTS[0]] * 3, [4, 5, 6]), rtol=1e-4, atol=1e-5
    )

    slices = torch.rand(2, 1, *IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    source = ConditionImage(path=Path("volume.nii.gz"), slices=slices, kind="volume", shape=(*IMAGE_SIZE, 2))
    variations = unclip_requests(PROMPTS[0], num_samples=2, seed=10, source=source)
    assert [(r["source_slice"], r["seed"]) for r in variations] == [(0, 10), (0, 11), (1, 10), (1, 11)]
    assert all(r["name"].startswith("variation of volume slice") for r in variations)
    made = _run_requests(pipeline, variations, batch_size=3)  # batches that cut across slices
    torch.testing.assert_close(made, pipeline.variations(slices, [10, 10], num_variations=2), rtol=1e-4, atol=1e-5)

    path = unclip_requests(PROMPTS[0], num_samples=1, seed=3, interpolate_to=PROMPTS[1], interpolation_steps=4)
    assert [r["weight"] for r in path] == [0.0, 1 / 3, 2 / 3, 1.0] and {r["seed"] for r in path} == {3}
    assert len({r["name"] for r in path}) == 4, "every step has its own output name"
    torch.testing.assert_close(
        _run_requests(pipeline, path, batch_size=3),
        pipeline.interpolate(PROMPTS[0], PROMPTS[1], steps=4, seed=3),
        rtol=1e-4,
        atol=1e-5,
    )


def test_requests_refuse_two_modes_and_bad_counts():
    from common.data.condition_images import ConditionImage
    from common.diffusion.unclip_requests import unclip_requests

    source = ConditionImage(path=Path("a.png"), slices=torch.zeros(1, 1, 4, 4), kind="slice", shape=(4, 4))
    with pytest.raises(ValueError, match="not both"):
        unclip_requests("a brain", 1, 0, source=source, interpolate_to="another brain")
    with pytest.raises(ValueError, match="interpolation_steps"):
        unclip_requests("a brain", 1, 0, interpolate_to="another brain", interpolation_steps=1)
    with pytest.raises(ValueError, match="empty"):
        unclip_requests("a brain", 1, 0, interpolate_to=" ")  # a blank second prompt is not "no interpolation"
    with pytest.raises(ValueError, match="num_samples"):
        unclip_requests("a brain", 0, 0, source=source)


def test_requested_facts_are_read_from_canonical_prompts_only():
    from common.diffusion.unclip_requests import requested_facts

    facts = requested_facts(
        "T1-weighted brain MRI, axial slice at z=+13 mm, 70-year-old subject; large lateral ventricles; "
        "grey matter 41%, white matter 43%, CSF 16%"
    )
    assert facts == {
        "contrast": "T1-weighted",
        "plane": "axial",
        "position_mm": 13.0,
        "age": 70.0,
        "ventricle_size": "large",
        "grey_matter": 0.41,
        "white_matter": 0.43,
        "csf": 0.16,
    }
    assert requested_facts("An old brain with big ventricles.") is None and requested_facts(None) is None
