"""common.networks.prior: the unCLIP diffusion prior and its embedding standardiser."""

from __future__ import annotations

import json

import pytest
import torch

from common.networks import architecture
from common.networks.prior import DiffusionPrior, EmbeddingStandardizer

D_EMB, D_TEXT, TOKENS, BATCH = 16, 12, 5, 4
ARGS = {"embedding_dim": D_EMB, "text_token_dim": D_TEXT, "width": 32, "num_layers": 2, "num_heads": 4}


def _prior(seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    return DiffusionPrior(**ARGS).eval()


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, D_EMB, generator=g),
        "timesteps": torch.randint(0, 1000, (BATCH,), generator=g),
        "text_embedding": torch.randn(BATCH, D_EMB, generator=g),
        "text_tokens": torch.randn(BATCH, TOKENS, D_TEXT, generator=g),
    }


# DiffusionPrior ---------------------------------------------------------------------------------------


def test_output_is_one_embedding_per_sample_with_or_without_tokens():
    prior, inputs = _prior(), _inputs()
    assert prior(**inputs).shape == (BATCH, D_EMB)
    without_tokens = {k: v for k, v in inputs.items() if k != "text_tokens"}
    out = prior(**without_tokens)
    assert out.shape == (BATCH, D_EMB)
    assert not torch.allclose(out, prior(**inputs))  # the tokens are read


def test_output_depends_on_the_noisy_embedding_and_the_timestep():
    prior, inputs = _prior(), _inputs()
    out = prior(**inputs)
    assert not torch.allclose(out, prior(**{**inputs, "x": inputs["x"] + 1}))
    assert not torch.allclose(out, prior(**{**inputs, "timesteps": inputs["timesteps"] // 2}))


def test_padding_tokens_are_ignored():
    prior, inputs = _prior(), _inputs()
    mask = torch.ones(BATCH, TOKENS, dtype=torch.bool)
    mask[:, 3:] = False
    changed = inputs["text_tokens"].clone()
    changed[:, 3:] = 100.0
    out = prior(**inputs, text_mask=mask)
    torch.testing.assert_close(prior(**{**inputs, "text_tokens": changed}, text_mask=mask), out)
    assert not torch.allclose(out, prior(**inputs))  # without the mask, the padding counts


def test_drop_text_swaps_in_the_null_condition_only_where_dropped():
    prior, inputs = _prior(), _inputs()
    mask = torch.ones(BATCH, TOKENS, dtype=torch.bool)
    mask[:, 2:] = False
    drop = torch.tensor([True, False, True, False])
    out = prior(**inputs, text_mask=mask, drop_text=drop)

    kept = prior(**inputs, text_mask=mask)
    torch.testing.assert_close(out[~drop], kept[~drop])
    assert not torch.allclose(out[drop], kept[drop])
    # a dropped sample no longer sees its text: any other caption gives the same prediction
    other = {**inputs, "text_embedding": -inputs["text_embedding"], "text_tokens": -inputs["text_tokens"]}
    torch.testing.assert_close(prior(**other, text_mask=mask, drop_text=drop)[drop], out[drop])
    # all dropped = the unconditional model, whatever the mask said
    everything = torch.ones(BATCH, dtype=torch.bool)
    torch.testing.assert_close(
        prior(**inputs, drop_text=everything), prior(**other, text_mask=mask, drop_text=everything)
    )


def test_null_condition_is_learned_from_dropped_samples_only():
    prior, inputs = _prior().train(), _inputs()
    prior(**inputs, drop_text=torch.tensor([False] * BATCH)).sum().backward()
    assert prior.null_text_embedding.grad is None or not prior.null_text_embedding.grad.any()
    prior.zero_grad()
    prior(**inputs, drop_text=torch.tensor([True, False, False, False])).sum().backward()
    assert prior.null_text_embedding.grad.abs().sum() > 0
    assert prior.null_text_tokens.grad[:TOKENS].abs().sum() > 0


def test_too_many_tokens_are_refused():
    prior, inputs = _prior(), _inputs()
    inputs["text_tokens"] = torch.randn(BATCH, 78, D_TEXT)
    with pytest.raises(ValueError, match="max_text_tokens"):
        prior(**inputs)


def test_prior_builds_from_its_architecture_record_with_its_statistics():
    torch.manual_seed(0)
    prior = architecture.build_network("DiffusionPrior", **ARGS).eval()
    prior.standardizer.fit(torch.randn(32, D_EMB) * 3 + 1)
    records = architecture.architecture_records({"prior": prior})
    json.dumps(records)  # the record is plain JSON
    weights = {"prior": prior.state_dict(), architecture.ARCHITECTURES_KEY: records}

    rebuilt = architecture.network_from_weights(weights, "prior").eval()
    torch.testing.assert_close(rebuilt(**_inputs()), prior(**_inputs()))
    torch.testing.assert_close(rebuilt.standardizer.mean, prior.standardizer.mean)
    assert bool(rebuilt.standardizer.fitted)


# EmbeddingStandardizer --------------------------------------------------------------------------------


def _embeddings(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_EMB, generator=g) * torch.linspace(0.1, 5.0, D_EMB) + torch.arange(D_EMB)


def test_standardizer_gives_unit_statistics_and_round_trips():
    embeddings = _embeddings()
    standardizer = EmbeddingStandardizer(D_EMB).fit(embeddings)
    z = standardizer.standardize(embeddings)
    torch.testing.assert_close(z.mean(0), torch.zeros(D_EMB), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(D_EMB), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardizer.destandardize(z), embeddings, atol=1e-5, rtol=1e-5)


def test_standardizer_statistics_persist_in_the_state_dict():
    standardizer = EmbeddingStandardizer(D_EMB).fit(_embeddings())
    loaded = EmbeddingStandardizer(D_EMB)
    loaded.load_state_dict(standardizer.state_dict())
    probe = _embeddings(8, seed=1)
    torch.testing.assert_close(loaded.standardize(probe), standardizer.standardize(probe))
    assert set(DiffusionPrior(**ARGS).state_dict()) >= {"standardizer.mean", "standardizer.std", "standardizer.fitted"}


def test_standardizer_refuses_to_work_unfitted_and_to_fit_bad_shapes():
    standardizer = EmbeddingStandardizer(D_EMB)
    with pytest.raises(RuntimeError, match="fit"):
        standardizer.standardize(_embeddings(4))
    with pytest.raises(RuntimeError, match="fit"):
        standardizer.destandardize(_embeddings(4))
    with pytest.raises(ValueError, match="shape"):
        standardizer.fit(torch.randn(10, D_EMB + 1))
    constant = torch.ones(10, D_EMB)
    assert torch.isfinite(EmbeddingStandardizer(D_EMB).fit(constant).standardize(constant)).all()
