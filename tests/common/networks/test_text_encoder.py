"""common.networks.text_encoder: the frozen CLIP prompt encoder and how text towers are loaded."""

from __future__ import annotations

import logging

import pytest
import torch

from common.networks.text_encoder import CLIPPromptEncoder, build_clip_text_model, load_pretrained_text_model
from common.networks.tokenizer import tokenize_prompts
from tests.conftest import CONTEXT_DIM, make_prompt_encoder, make_text_model

PROMPT = "T1-weighted image of a brain."
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _ForwardCounter:
    """Forward hook on the text tower: how many times it ran, and on how many prompts."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.batch_sizes: list[int] = []
        module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.batch_sizes.append(ids.shape[0])


# build_clip_text_model -------------------------------------------------------------------------------


def test_build_clip_text_model_config():
    model = build_clip_text_model(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 2)
    assert config.intermediate_size == 128
    assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (49406, 49407, 0)


# CLIPPromptEncoder -----------------------------------------------------------------------------------


def test_encoder_loads_the_tokenizer_and_encodes(tokenizer_dir):
    encoder = CLIPPromptEncoder(str(tokenizer_dir), make_text_model())
    context = encoder([PROMPT, ""])
    assert context.shape == (2, 77, CONTEXT_DIM)
    assert encoder.context_dim == CONTEXT_DIM
    assert not torch.allclose(context[0], context[1])


def test_output_matches_the_text_model(prompt_encoder):
    ids, _ = tokenize_prompts(prompt_encoder.tokenizer, [PROMPT])
    with torch.no_grad():
        expected = prompt_encoder.text_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(prompt_encoder([PROMPT]), expected)


def test_frozen(prompt_encoder):
    assert not any(p.requires_grad for p in prompt_encoder.parameters())
    with torch.enable_grad():
        context = prompt_encoder([PROMPT])
    assert not context.requires_grad


def test_train_keeps_eval_mode(prompt_encoder):
    wrapper = torch.nn.ModuleDict({"encoder": prompt_encoder, "other": torch.nn.Dropout()})
    wrapper.train()  # what an engine does to its networks
    assert wrapper["other"].training
    assert not prompt_encoder.training
    assert not any(m.training for m in prompt_encoder.text_model.modules())
    prompt_encoder.train(True)
    assert not prompt_encoder.text_model.training


def test_cache_runs_the_text_model_once_per_distinct_prompt(prompt_encoder):
    counter = _ForwardCounter(prompt_encoder.text_model)
    first = prompt_encoder([PROMPT, "", PROMPT])
    assert counter.batch_sizes == [2]  # two distinct prompts, one batch
    torch.testing.assert_close(first[0], first[2], rtol=0, atol=0)

    second = prompt_encoder(["", PROMPT])
    assert counter.batch_sizes == [2]  # cached: the text model did not run
    torch.testing.assert_close(second, first[[1, 0]], rtol=0, atol=0)

    third = prompt_encoder(["brain", PROMPT])
    assert counter.batch_sizes == [2, 1]  # only the new prompt is encoded
    assert third.shape == (2, 77, CONTEXT_DIM)


def test_encoding_does_not_depend_on_batch_companions():
    alone = make_prompt_encoder()([PROMPT])
    together = make_prompt_encoder()(["a chest X-ray with a large effusion", PROMPT, ""])
    torch.testing.assert_close(together[1], alone[0], rtol=1e-5, atol=1e-5)


def test_cache_overflow_with_new_prompts_only():
    reference = make_prompt_encoder()
    small = make_prompt_encoder(cache_size=2)
    for batch in (["a", "b"], ["c"], ["d", "e", "f"], ["g"]):  # each batch is entirely new to the cache
        torch.testing.assert_close(small(batch), reference(batch))
    assert len(small._cache) <= 3


def test_cache_overflow_with_a_batch_mixing_cached_and_new_prompts():
    reference = make_prompt_encoder()
    small = make_prompt_encoder(cache_size=2)
    small(["a"])  # cached
    small(["b"])  # cache full: {a, b}
    # "a" is cached, "c" is new: 2 + 1 > 2 clears the cache, then only "c" is stored.
    torch.testing.assert_close(small(["a", "c"]), reference(["a", "c"]))


def test_moving_the_encoder_clears_the_cache(prompt_encoder):
    assert prompt_encoder([PROMPT]).dtype == torch.float32
    prompt_encoder.double()
    context = prompt_encoder([PROMPT])
    assert context.dtype == torch.float64  # not the stale float32 entry


def test_a_single_string_is_refused(prompt_encoder):
    with pytest.raises(TypeError, match="sequence of strings"):
        prompt_encoder(PROMPT)


def _final_layer_norm(text_model):
    # transformers < 5 nests the tower as CLIPTextModel.text_model; transformers 5 flattened it.
    return getattr(text_model, "text_model", text_model).final_layer_norm


def test_penultimate_hidden_layer():
    """Stable Diffusion 2 context: hidden state of the penultimate layer, then the final layer norm."""
    torch.manual_seed(0)
    text_model = build_clip_text_model(hidden_size=CONTEXT_DIM, num_hidden_layers=2, num_attention_heads=2)
    penultimate = make_prompt_encoder(hidden_layer=-2, text_model=text_model)
    last = make_prompt_encoder(hidden_layer=-1, text_model=text_model)
    ids, _ = tokenize_prompts(penultimate.tokenizer, [PROMPT])
    with torch.no_grad():
        out = text_model(input_ids=ids, output_hidden_states=True)
        expected = _final_layer_norm(text_model)(out.hidden_states[-2])
    context = penultimate([PROMPT])
    assert context.shape == (1, 77, CONTEXT_DIM)
    torch.testing.assert_close(context, expected)
    assert not torch.allclose(context, last([PROMPT]))


def test_truncated_prompt_warns_once(prompt_encoder, caplog):
    long_prompt = " ".join(["brain"] * 100)
    with caplog.at_level(logging.WARNING, logger="common.text.encoder"):
        prompt_encoder([long_prompt])
        prompt_encoder._cache.clear()
        prompt_encoder([long_prompt])
        prompt_encoder([PROMPT])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1
    assert prompt_encoder([long_prompt]).shape == (1, 77, CONTEXT_DIM)


# load_pretrained_text_model --------------------------------------------------------------------------


@pytest.mark.parametrize("revision", [None, "main", "v1.0", COMMIT[:7], COMMIT.upper()])
def test_unpinned_hub_id_is_refused(revision):
    with pytest.raises(ValueError, match="40-character commit"):
        load_pretrained_text_model("stabilityai/not-a-real-text-encoder", revision=revision)


def test_pinned_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained_text_model("example-org/not-a-real-text-encoder", revision=COMMIT, subfolder="text_encoder")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message
    assert f"huggingface-cli download example-org/not-a-real-text-encoder --revision {COMMIT}" in message


def test_local_directory_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_text_model(seed=3).eval()
    model.save_pretrained(tmp_path / "clip" / "text_encoder")
    loaded = load_pretrained_text_model(str(tmp_path / "clip"), subfolder="text_encoder").eval()
    assert loaded.config.hidden_size == CONTEXT_DIM
    ids = torch.tensor([[49406, 320, 1929, 49407] + [0] * 73])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    loaded_flat = load_pretrained_text_model(str(tmp_path / "clip" / "text_encoder"))
    assert loaded_flat.config.num_hidden_layers == 1


def test_missing_local_directory_is_not_treated_as_local(tmp_path):
    with pytest.raises(ValueError, match="neither a local directory nor pinned"):
        load_pretrained_text_model(str(tmp_path / "no_such_dir"))
