"""common.networks.clip_model: building and loading CLIPs offline, the grayscale adapter, the encoder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPModel

from common.networks.clip_model import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    ClipEncoder,
    ClipImageAdapter,
    build_small_clip,
    clip_image_normalization,
    clip_text_tower,
    load_clip,
)
from common.networks.tokenizer import tokenize_prompts
from tests.conftest import TOKENIZER_DIR, _cached_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMALL = {"image_size": 32, "patch_size": 8, "vision_width": 32, "text_width": 48, "heads": 2, "projection_dim": 24}
CAPTIONS = ["Axial T1 slice of a healthy brain.", "A bright blob", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return _cached_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ClipEncoder(build_small_clip(**SMALL, seed=0), tokenizer).eval()


# build_small_clip / load_clip ------------------------------------------------------------------------------------


def test_small_clip_config_uses_the_tokenizer_ids():
    model = build_small_clip(**SMALL)
    build_info = json.loads((TOKENIZER_DIR / "build_info.json").read_text())["ids"]
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        build_info["bos"],
        build_info["eos"],
        build_info["pad"],
    )
    assert (text.vocab_size, text.max_position_embeddings) == (build_info["vocab_size"], 77)
    assert (text.hidden_size, text.intermediate_size, vision.hidden_size, vision.intermediate_size) == (
        48,
        192,
        32,
        128,
    )
    assert (vision.image_size, vision.patch_size, vision.num_channels, model.config.projection_dim) == (32, 8, 3, 24)
    assert model.logit_scale.requires_grad
    assert model.logit_scale.item() == pytest.approx(2.6592, abs=1e-4)  # CLIP's ln(1 / 0.07)


def test_seed_fixes_the_weights_without_touching_the_global_rng():
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a, b = build_small_clip(**SMALL, seed=1), build_small_clip(**SMALL, seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    c = build_small_clip(**SMALL, seed=2)
    assert not torch.equal(a.text_projection.weight, c.text_projection.weight)


@pytest.mark.parametrize(("args", "match"), [({"image_size": 30}, "multiple of"), ({"heads": 5}, "must divide")])
def test_small_clip_refuses_inconsistent_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        build_small_clip(**{**SMALL, **args})


def test_load_clip_without_a_source_builds_a_small_one():
    for source in (None, ""):
        model = load_clip(source, **SMALL)
        assert isinstance(model, CLIPModel) and model.config.projection_dim == 24


@pytest.mark.parametrize("revision", [None, "main", "v1.0", COMMIT[:7], COMMIT.upper()])
def test_unpinned_hub_id_is_refused(revision):
    with pytest.raises(ValueError, match="40-character commit"):
        load_clip("openai/clip-vit-base-patch32", revision=revision)


def test_pinned_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache") as err:
        load_clip("example-org/not-a-real-clip", revision=COMMIT)
    assert f"huggingface-cli download example-org/not-a-real-clip --revision {COMMIT}" in str(err.value)


def test_local_directory_round_trip(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_small_clip(**SMALL, seed=3)
    model.save_pretrained(tmp_path / "clip")
    loaded = load_clip(str(tmp_path / "clip"), image_size=64)  # size arguments are ignored for a pretrained CLIP
    assert loaded.config.vision_config.image_size == 32
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    images = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ClipEncoder(model.eval(), tokenizer), ClipEncoder(loaded.eval(), tokenizer)
        torch.testing.assert_close(a.encode_images(images), b.encode_images(images))
        torch.testing.assert_close(a.encode_texts(CAPTIONS), b.encode_texts(CAPTIONS))


def test_text_tower_is_the_trained_tower_and_its_file_rebuilds_it(tmp_path, tokenizer):
    """The exported text tower holds the CLIP's weights as trained up to export, and rebuilds from its file alone."""
    from common.engines.handlers import WeightsExporter
    from common.networks.text_encoder import CLIPPromptEncoder, load_text_model

    model = build_small_clip(**SMALL, seed=0)
    tower = clip_text_tower(model)
    with torch.no_grad():  # a training step changes the CLIP after the tower was taken
        model.text_model.embeddings.token_embedding.weight.add_(1.0)
    WeightsExporter(str(tmp_path / "text_encoder.pt"), {"text_encoder": tower}).__call__()
    loaded = load_text_model(None, None, tmp_path / "text_encoder.pt")
    assert loaded.config.hidden_size == SMALL["text_width"]
    assert not any(k.startswith(("vision_model", "visual_projection")) for k in loaded.state_dict())
    ids, _ = tokenize_prompts(tokenizer, CAPTIONS)
    with torch.no_grad():
        expected = model.text_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected)
        context = CLIPPromptEncoder(str(TOKENIZER_DIR), loaded)(CAPTIONS)
    assert context.shape == (3, 77, SMALL["text_width"])


def test_text_tower_refuses_what_its_record_cannot_rebuild():
    model = build_small_clip(**SMALL, seed=0)
    model.config.text_config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'.*save_pretrained"):
        clip_text_tower(model)


def test_missing_local_directory_is_not_treated_as_local(tmp_path):
    with pytest.raises(ValueError, match="neither a local directory nor pinned"):
        load_clip(str(tmp_path / "no_such_dir"))


def test_image_normalization_defaults_and_preprocessor_config(tmp_path):
    assert CLIP_IMAGE_MEAN == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert CLIP_IMAGE_STD == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert clip_image_normalization(None) == (CLIP_IMAGE_MEAN, CLIP_IMAGE_STD)
    assert clip_image_normalization(tmp_path) == (CLIP_IMAGE_MEAN, CLIP_IMAGE_STD)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert clip_image_normalization(tmp_path) == ((0.5,) * 3, (0.5,) * 3)


# ClipImageAdapter ------------------------------------------------------------------------------------------------


def _unnormalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).view(1, 3, 1, 1)
    return pixels * std + mean


def test_adapter_shape_range_and_channels():
    adapter = ClipImageAdapter(32)
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    pixels = adapter(images)
    assert pixels.shape == (3, 3, 32, 32)
    rgb = _unnormalize(pixels)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    torch.testing.assert_close(rgb[:, 0], rgb[:, 1])
    torch.testing.assert_close(rgb[:, 0], rgb[:, 2])
    # black and white map to CLIP's normalised extremes
    extremes = adapter(torch.stack([torch.zeros(1, 32, 32), torch.ones(1, 32, 32)]))
    for c in range(3):
        assert extremes[0, c].unique().item() == pytest.approx(-CLIP_IMAGE_MEAN[c] / CLIP_IMAGE_STD[c], rel=1e-5)
        assert extremes[1, c].unique().item() == pytest.approx((1 - CLIP_IMAGE_MEAN[c]) / CLIP_IMAGE_STD[c], rel=1e-5)


def test_adapter_keeps_the_size_and_pads_non_square_slices():
    adapter = ClipImageAdapter(16)
    images = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(_unnormalize(adapter(images))[:, :1], images)  # no resampling at the right size
    wide = torch.ones(1, 1, 8, 16)
    rgb = _unnormalize(adapter(wide))[0, 0]
    torch.testing.assert_close(rgb[4:12], torch.ones(8, 16))  # centred, not stretched
    torch.testing.assert_close(rgb[:4], torch.zeros(4, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(rgb[12:], torch.zeros(4, 16), atol=1e-5, rtol=0)


def test_adapter_takes_rgb_and_refuses_other_shapes():
    adapter = ClipImageAdapter(8)
    rgb = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(_unnormalize(adapter(rgb)), rgb)
    for shape in [(2, 2, 8, 8), (1, 8, 8)]:
        with pytest.raises(ValueError, match="Expected images"):
            adapter(torch.rand(shape))


# ClipEncoder -----------------------------------------------------------------------------------------------------


def test_encoder_embeddings_are_unit_norm(encoder):
    images = torch.rand(4, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image_emb, text_emb = encoder.encode_images(images), encoder.encode_texts(CAPTIONS)
    assert image_emb.shape == (4, 24) and text_emb.shape == (3, 24) and encoder.embedding_dim == 24
    torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=1), torch.ones(3))
    assert not torch.allclose(text_emb[0], text_emb[1])


def test_encoder_text_embedding_is_clips(encoder, tokenizer):
    ids, _ = tokenize_prompts(tokenizer, CAPTIONS)
    with torch.no_grad():
        reference = encoder.model(input_ids=ids, pixel_values=torch.zeros(3, 3, 32, 32)).text_embeds
        torch.testing.assert_close(encoder.encode_texts(CAPTIONS), reference)


def test_text_tokens_and_mask(encoder, tokenizer):
    with torch.no_grad():
        tokens, mask = encoder.text_tokens(CAPTIONS)
    assert tokens.shape == (3, 77, encoder.text_width) == (3, 77, 48)
    assert mask.dtype == torch.bool and mask.shape == (3, 77)
    ids, _ = tokenize_prompts(tokenizer, CAPTIONS)
    lengths = (ids == tokenizer.eos_token_id).int().argmax(1) + 1  # start .. end tokens
    assert mask.sum(1).tolist() == lengths.tolist()
    assert mask[2].sum() == 2  # empty caption: start and end
    assert all(mask[i, : lengths[i]].all() and not mask[i, lengths[i] :].any() for i in range(3))


def test_forward_returns_the_loss_inputs(encoder):
    images = torch.rand(3, 1, 32, 32)
    image_emb, text_emb, logit_scale = encoder(images, captions=CAPTIONS)
    assert image_emb.shape == text_emb.shape == (3, 24)
    assert logit_scale is encoder.model.logit_scale and isinstance(logit_scale, torch.nn.Parameter)


def test_encoder_refuses_one_string_and_a_too_small_vocabulary(encoder, tokenizer):
    with pytest.raises(TypeError, match="not one string"):
        encoder.encode_texts("a brain")
    with pytest.raises(ValueError, match="more than the CLIP text vocabulary"):
        ClipEncoder(build_small_clip(**SMALL, vocab_size=1000), tokenizer)


def test_long_captions_warn_once_and_a_tokenizer_path_is_loaded(caplog):
    encoder = ClipEncoder(build_small_clip(**SMALL, seed=0), str(TOKENIZER_DIR))
    long_caption = " ".join(["brain"] * 100)
    with caplog.at_level("WARNING", logger="common.networks.clip_model"):
        for _ in range(2):
            ids, mask = encoder.tokenize([long_caption, "short"])
    assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1
    assert ids.shape == (2, 77) and mask[0].all() and ids[0, -1] == encoder.tokenizer.eos_token_id
