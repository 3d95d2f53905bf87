"""common.networks.tokenizer and build-clip-tokenizer: same ids as open_clip, SD-2 padding, truncation."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from common.networks.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PromptError,
    load_clip_tokenizer,
    normalize_prompt,
    tokenize_prompts,
)
from tests.helpers import REPO_ROOT
from tools import build_clip_tokenizer

SHIPPED_DIR = REPO_ROOT / "bundles" / "brain_t1_ldm" / "models" / "tokenizer"

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
needs_open_clip = pytest.mark.skipif(
    not HAS_OPEN_CLIP, reason="open-clip-torch not installed (pip install --no-deps open-clip-torch)"
)

PROMPTS = [
    "T1-weighted image of a brain.",
    "Chest X-ray: small left pleural effusion, no pneumothorax.",
    "MiXeD CaSe Prompt WITH Capitals",
    "punctuation!!! does it work?! (yes) [no] {maybe}; a/b - c_d, e.f",
    "numbers 123 4567 3.14 1e-5 50% 0.5mm 160x224",
    "   extra    spaces\tand\ttabs\nand newlines   ",
    "brain!",
    "!",
    "It’s a “curly” quote &amp; an HTML entity &lt;3",
    "ﬁbrosis ＦＵＬＬＷＩＤＴＨ ｃｈａｒｓ",
    "Ünïcödé façade naïve São Paulo 日本語 🧠 — en–dash",
    "don't we'll they're I'm you've she'd it's",
    "ventricles enlarged; cortical thinning (mild), white-matter hyperintensities",
    "",
    "   ",
    "word " * 100,
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The shipped tokenizer directory; built into a temporary folder when the checkout lacks it."""
    if (SHIPPED_DIR / "vocab.json").is_file():
        return SHIPPED_DIR
    if not HAS_OPEN_CLIP:
        pytest.skip("no shipped tokenizer and open-clip-torch not installed to build one")
    return Path(build_clip_tokenizer.build(str(tmp_path_factory.mktemp("tokenizer"))))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_clip_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference():
    """open_clip's SimpleTokenizer, loaded from its file without importing the open_clip package."""
    if not HAS_OPEN_CLIP:
        pytest.skip("open-clip-torch not installed")
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    env_before = os.environ.get("TOKENIZERS_PARALLELISM")
    module_spec = importlib.util.spec_from_file_location("_open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    # the module sets TOKENIZERS_PARALLELISM at import; do not leak that into other tests
    if env_before is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = env_before
    assert "open_clip" not in sys.modules
    return module.SimpleTokenizer()


# --- same ids as open_clip ------------------------------------------------------------------------------------------


def test_vocabulary_matches_open_clip(tok, reference):
    assert len(tok) == len(reference.encoder) == 49408
    ids = list(range(49406))
    assert tok.convert_ids_to_tokens(ids) == [reference.decoder[i] for i in ids]
    assert tok.bos_token_id == reference.sot_token_id == BOS_ID
    assert tok.eos_token_id == reference.eot_token_id == EOS_ID


def test_ids_match_open_clip(tok, reference):
    ours, truncated = tokenize_prompts(tok, PROMPTS)
    theirs = reference(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert ours[i].tolist() == theirs[i].tolist(), prompt
    assert truncated == [False] * (len(PROMPTS) - 1) + [True]


def test_ids_match_open_clip_random_text(tok, reference):
    rng = random.Random(0)
    words = ["brain", "T1w", "FLAIR", "lesion", "X-ray", "mm", "3.5", "Ödem", "naïve", "cortex", "Left", "RIGHT"]
    chars = "abcXYZ019 .,;:!?'\"-()/%&+#@*é’“ﬁＡ\t"
    prompts = []
    for _ in range(300):
        if rng.random() < 0.5:
            prompts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
        else:
            prompts.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 60))))
    ours, _ = tokenize_prompts(tok, prompts)
    theirs = reference(prompts)
    mismatches = [p for p, a, b in zip(prompts, ours, theirs, strict=True) if not torch.equal(a, b)]
    assert not mismatches


def test_exclamation_mark_is_not_the_pad_token(tok, reference):
    # the SD-2 pad token "!" (id 0) must not be split out of prompts: "brain!" ends with "!</w>" (256)
    ids, _ = tokenize_prompts(tok, ["brain!"])
    assert ids[0, :4].tolist() == [BOS_ID, reference.encoder["brain</w>"], 256, EOS_ID]
    assert tok.pad_token_id == PAD_ID


# --- layout: start, end, padding, truncation ------------------------------------------------------------------------


def test_layout_start_end_padding(tok):
    ids, truncated = tokenize_prompts(tok, ["T1-weighted image of a brain.", "a"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert truncated == [False, False]
    for row in ids:
        n = int((row == EOS_ID).nonzero()[0])
        assert row[0] == BOS_ID
        assert (row[n + 1 :] == PAD_ID).all()
        assert (row[1:n] != EOS_ID).all()
    assert ids[1, :3].tolist() == [BOS_ID, 320, EOS_ID]


def test_truncation_keeps_end_token(tok):
    long = "brain " * 200
    ids, truncated = tokenize_prompts(tok, [long, "short"])
    assert truncated == [True, False]
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID
    assert (ids[0, 1:-1] == tok.convert_tokens_to_ids("brain</w>")).all()
    # exactly at the limit: 75 content tokens fit, 76 do not
    exact, cut = tokenize_prompts(tok, ["brain " * 75, "brain " * 76])
    assert cut == [False, True]
    assert exact[0, -1] == EOS_ID and torch.equal(exact[0], exact[1])


def test_custom_max_length_and_single_string(tok):
    ids, truncated = tokenize_prompts(tok, "one two three four", max_length=4)
    assert ids.shape == (1, 4) and truncated == [True]
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID
    with pytest.raises(ValueError):
        tokenize_prompts(tok, ["x"], max_length=1)


def test_empty_prompt_is_start_end_then_padding(tok):
    ids, truncated = tokenize_prompts(tok, ["", "   \n\t"])
    expected = [BOS_ID, EOS_ID] + [PAD_ID] * 75
    assert ids.tolist() == [expected, expected] and truncated == [False, False]
    empty, _ = tokenize_prompts(tok, [])
    assert empty.shape == (0, 77)


def test_no_transformers_length_warning(tok, caplog):
    _, truncated = tokenize_prompts(tok, ["cortex " * 300])
    assert truncated == [True]
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]


def test_tokenize_rejects_bad_input(tok):
    with pytest.raises(PromptError):
        tokenize_prompts(tok, ["ok", None])
    with pytest.raises(ValueError, match="reserved"):
        tokenize_prompts(tok, ["a <|endoftext|> b"])


def test_normalize_prompt():
    assert normalize_prompt("  It’s  “x” &amp;amp; ﬁne ＡＢ\r\n ") == 'It\'s "x" & fine AB'


# --- loading --------------------------------------------------------------------------------------------------------


def test_loader_class_and_config(tok):
    import transformers

    expected = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    assert isinstance(tok, expected)
    assert tok.model_max_length == 77
    assert tok.pad_token == "!" and tok.pad_token_id == 0


def test_missing_directory_names_the_tool(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_clip_tokenizer.py"):
        load_clip_tokenizer(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match="open-clip-torch"):
        load_clip_tokenizer(tmp_path)  # exists, but holds no vocabulary


# --- the build tool -------------------------------------------------------------------------------------------------


@needs_open_clip
def test_build_tool_output_matches_shipped_and_loads(tmp_path):
    out = Path(build_clip_tokenizer.build(str(tmp_path / "tok")))
    names = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "build_info.json"}
    assert {p.name for p in out.iterdir()} == names  # atomic writes leave no temporary files
    assert "open_clip" not in sys.modules
    if (SHIPPED_DIR / "vocab.json").is_file():
        for name in names - {"build_info.json"}:
            assert (out / name).read_bytes() == (SHIPPED_DIR / name).read_bytes(), name
        shipped_info = json.loads((SHIPPED_DIR / "build_info.json").read_text())
        assert json.loads((out / "build_info.json").read_text())["source_sha256"] == shipped_info["source_sha256"]
    fresh = load_clip_tokenizer(out)
    assert tokenize_prompts(fresh, ["brain!"])[0][0, :4].tolist() == [BOS_ID, 4812, 256, EOS_ID]


def test_build_tool_without_open_clip(monkeypatch, tmp_path):
    monkeypatch.setattr(build_clip_tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
        build_clip_tokenizer.build(str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()


def test_build_tool_rejects_a_wrong_file(tmp_path):
    import gzip

    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(ValueError, match="not a CLIP BPE"):
        build_clip_tokenizer.build(str(tmp_path / "tok"), bpe_path=str(bad))
