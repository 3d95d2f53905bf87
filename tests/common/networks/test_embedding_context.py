"""common.networks.embedding_context: image embeddings as cross-attention context, the null embedding, the decoder."""

from __future__ import annotations

import json

import pytest
import torch
from monai.inferers import DiffusionInferer

from common.diffusion.latent_space import ScaledLatentSpace
from common.diffusion.sampling import GuidedLatentSampler
from common.diffusion.schedules import SchedulerSettings
from common.networks.architecture import NetworkArchitecture, build_network
from common.networks.embedding_context import (
    EmbeddingConditionedUNet,
    EmbeddingToContext,
    build_embedding_conditioned_unet,
    null_context,
)
from common.networks.lora import cross_attention_targets
from tests.conftest import CONTEXT_DIM, LATENT, LATENT_CHANNELS, CallRecorder, make_autoencoder, make_unet

D_EMB, TOKENS = 16, 4

UNET_ARGS = {
    "spatial_dims": 2,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "channels": (8, 8),
    "num_res_blocks": 1,
    "attention_levels": (False, True),
    "num_head_channels": (0, 8),
    "with_conditioning": True,
    "cross_attention_dim": CONTEXT_DIM,
    "norm_num_groups": 8,
}


def _decoder(seed: int = 0) -> EmbeddingConditionedUNet:
    unet = make_unet(seed)  # output convolutions given random values: outputs depend on the context
    torch.manual_seed(seed)
    return EmbeddingConditionedUNet(unet, EmbeddingToContext(D_EMB, CONTEXT_DIM, TOKENS)).eval()


def _embeddings(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, D_EMB, generator=g), dim=-1)


def _inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *LATENT, generator=g), torch.randint(0, 1000, (batch,), generator=g)


# EmbeddingToContext -----------------------------------------------------------------------------------------------


def test_projection_maps_embeddings_to_normalised_context_tokens():
    torch.manual_seed(0)
    projection = EmbeddingToContext(D_EMB, CONTEXT_DIM, TOKENS)
    emb = _embeddings(3)
    context = projection(emb)
    assert context.shape == (3, TOKENS, CONTEXT_DIM)
    # layer norm per token (fresh affine: weight 1, bias 0)
    torch.testing.assert_close(context.mean(-1), torch.zeros(3, TOKENS), atol=1e-5, rtol=0)
    torch.testing.assert_close(projection(emb[:, None]), context)  # (B, 1, D) is accepted too
    assert projection.null_embedding.shape == (D_EMB,) and projection.null_embedding.requires_grad


def test_drop_mask_and_zero_rows_select_the_learned_null_embedding():
    torch.manual_seed(0)
    projection = EmbeddingToContext(D_EMB, CONTEXT_DIM, TOKENS)
    emb, other = _embeddings(3, seed=0), _embeddings(3, seed=1)
    drop = torch.tensor([True, False, True])
    null = projection(projection.null_embedding.detach()[None])[0]

    dropped = projection(emb, drop)
    torch.testing.assert_close(projection(other, drop)[drop], dropped[drop])  # whatever the embedding
    torch.testing.assert_close(dropped[0], null)
    torch.testing.assert_close(dropped[2], null)
    torch.testing.assert_close(dropped[1], projection(emb)[1])
    # an all-zero row is a dropped sample
    zeroed = torch.where(drop[:, None], null_context(emb), emb)
    torch.testing.assert_close(projection(zeroed), dropped)
    assert projection.dropped(zeroed).tolist() == [True, False, True]
    assert projection.dropped(emb).tolist() == [False, False, False]


@pytest.mark.parametrize("shape", [(2, D_EMB + 1), (2, 2, D_EMB), (D_EMB,)])
def test_projection_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match="image embeddings of shape"):
        EmbeddingToContext(D_EMB, CONTEXT_DIM)(torch.randn(shape))


def test_projection_refuses_bad_arguments_and_mismatched_masks():
    with pytest.raises(ValueError, match="num_tokens"):
        EmbeddingToContext(D_EMB, CONTEXT_DIM, 0)
    with pytest.raises(ValueError, match="embedding_dim"):
        EmbeddingToContext(16.0, CONTEXT_DIM)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 entries for 2"):
        EmbeddingToContext(D_EMB, CONTEXT_DIM)(_embeddings(2), torch.zeros(3, dtype=torch.bool))


# EmbeddingConditionedUNet -----------------------------------------------------------------------------------------


def test_decoder_predicts_from_the_embedding_and_ignores_it_where_dropped():
    decoder = _decoder()
    x, t = _inputs(2)
    emb, other = _embeddings(2, seed=0), _embeddings(2, seed=1)
    with torch.no_grad():
        out = decoder(x, t, emb)
        assert out.shape == (2, *LATENT)
        assert not torch.allclose(out, decoder(x, t, other))  # the embedding matters
        all_dropped = decoder(x, t, emb, drop=torch.ones(2, dtype=torch.bool))
        torch.testing.assert_close(decoder(x, t, other, drop=torch.ones(2, dtype=torch.bool)), all_dropped)
        torch.testing.assert_close(decoder(x, t, null_context(emb)), all_dropped)
        null = decoder.projection.null_embedding.expand(2, -1)
        torch.testing.assert_close(decoder(x, timesteps=t, context=null), all_dropped)
        mixed = decoder(x, t, emb, drop=torch.tensor([False, True]))
        torch.testing.assert_close(mixed[0], out[0])
        torch.testing.assert_close(mixed[1], all_dropped[1])


def test_decoder_refuses_a_missing_context():
    x, t = _inputs(1)
    with pytest.raises(ValueError, match="needs `context`"):
        _decoder()(x, t)


def test_decoder_under_diffusion_inferer_with_gradients_to_the_projection():
    decoder = _decoder().train()
    scheduler = SchedulerSettings().build("ddpm")
    x, t = _inputs(3)
    noise = torch.randn_like(x)
    condition = torch.cat([_embeddings(2), null_context(_embeddings(1))])  # the third sample dropped
    prediction = DiffusionInferer(scheduler)(x, decoder, noise, t, condition=condition)
    assert prediction.shape == x.shape
    prediction.square().mean().backward()
    for p in (decoder.projection.proj.weight, decoder.projection.null_embedding):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_guided_latent_sampler_runs_the_decoder_unchanged_with_embeddings_as_context():
    """``context`` = embeddings, ``uncond_context`` = zeros: the unconditional branch is the null embedding."""
    torch.manual_seed(0)
    latent_space = ScaledLatentSpace(make_autoencoder(), scale_factor=0.5)
    decoder = _decoder()
    emb = _embeddings(2)
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(5))

    def sample(scale, context, uncond, network=decoder):
        sampler = GuidedLatentSampler(
            latent_space, SchedulerSettings(), num_inference_steps=2, guidance_scale=scale, progress=False
        )
        return sampler(noise, network, context=context, uncond_context=uncond)

    unconditional = sample(0.0, emb, null_context(emb))
    null = decoder.projection.null_embedding.detach().expand(2, -1)
    torch.testing.assert_close(sample(1.0, null, emb), unconditional)
    assert not torch.allclose(sample(1.0, emb, null_context(emb)), unconditional)

    recorder = CallRecorder(decoder)
    guided = sample(3.0, emb, null_context(emb), network=recorder)
    assert guided.shape == (2, 1, 16, 16)
    assert recorder.batch_sizes == [4, 4]  # one [uncond, cond] batch per step
    torch.testing.assert_close(recorder.contexts[0], torch.cat([null_context(emb), emb]))


def test_decoder_runs_under_bf16_autocast():
    decoder = _decoder()
    x, t = _inputs(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder(x, t, torch.cat([_embeddings(1), null_context(_embeddings(1))]))
    assert out.shape == (2, *LATENT) and torch.isfinite(out.float()).all()


def test_lora_finds_the_wrapped_unets_cross_attention():
    targets = cross_attention_targets(_decoder())
    assert targets and all(name.startswith("unet.") for name in targets)


# architecture records -----------------------------------------------------------------------------------------------


def test_builder_makes_the_decoder_from_plain_arguments():
    decoder = build_embedding_conditioned_unet(UNET_ARGS, embedding_dim=D_EMB, num_tokens=2)
    assert isinstance(decoder, EmbeddingConditionedUNet)
    assert decoder.embedding_dim == D_EMB
    assert decoder.projection.context_dim == CONTEXT_DIM and decoder.projection.num_tokens == 2
    x, t = _inputs(2)
    with torch.no_grad():
        assert decoder(x, t, _embeddings(2)).shape == (2, *LATENT)


def test_builder_refuses_a_unet_without_cross_attention():
    with pytest.raises(ValueError, match="cross-attention"):
        build_embedding_conditioned_unet({**UNET_ARGS, "with_conditioning": False}, embedding_dim=D_EMB)


def test_a_json_architecture_record_rebuilds_the_decoder():
    torch.manual_seed(0)
    decoder = build_network("EmbeddingConditionedUNet", unet=UNET_ARGS, embedding_dim=D_EMB, num_tokens=TOKENS)
    record = json.loads(json.dumps(decoder.architecture.to_dict()))
    rebuilt = NetworkArchitecture.from_dict(record).build()
    rebuilt.load_state_dict(decoder.state_dict())
    assert set(decoder.state_dict()) == set(rebuilt.state_dict())
    assert "projection.null_embedding" in decoder.state_dict()
    x, t = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, t, _embeddings(2)), decoder.eval()(x, t, _embeddings(2)))
