"""Offline CLIP tokenizer with the ids of OpenCLIP / Stable Diffusion 2 (start 49406, end 49407, padding 0).

The tokenizer directory is built once from the BPE vocabulary shipped in ``open-clip-torch`` by
``tools/build_clip_tokenizer.py`` and loaded here with ``transformers`` from the local directory only.

Usage::

    tok = load_clip_tokenizer("models/tokenizer")
    ids, truncated = tokenize_prompts(tok, ["A photo of a cat.", ""])  # (2, 77) LongTensor
    for prompt, cut in zip(prompts, truncated):
        if cut:
            logger.warning("prompt truncated to 77 tokens: %r", prompt)

Encoding matches ``open_clip.tokenizer.SimpleTokenizer`` (the tokenizer the OpenCLIP text towers of
Stable Diffusion 2 were trained with) token for token: prompts are first cleaned by
:func:`normalize_prompt`, a dependency-free version of the text cleaning open_clip does with ``ftfy``
and ``html.unescape``. The one ``ftfy`` step left out is mojibake repair (text decoded with the wrong
codec, such as "cafÃ©"): clean such text before it reaches the tokenizer.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BOS_ID",
    "CLIP_CONTEXT_LENGTH",
    "EOS_ID",
    "PAD_ID",
    "PromptError",
    "load_clip_tokenizer",
    "normalize_prompt",
    "tokenize_prompts",
]

CLIP_CONTEXT_LENGTH = 77
BOS_ID = 49406  # <|startoftext|>  (open_clip: <start_of_text>)
EOS_ID = 49407  # <|endoftext|>    (open_clip: <end_of_text>)
PAD_ID = 0  # Stable Diffusion 2 / OpenCLIP padding (the byte token "!")

BUILD_COMMAND = "python tools/build_clip_tokenizer.py --output_dir {path}"
_RESERVED_LITERALS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


class PromptError(ValueError):
    """A prompt that cannot be used: not a string, empty when that is not allowed, or holding a reserved token."""


# --- text cleaning (the parts of ftfy.fix_text + html.unescape that open_clip applies) ---------------------------

_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LIGATURES = {
    ord("Ĳ"): "IJ",
    ord("ĳ"): "ij",
    ord("ŉ"): "ʼn",
    ord("Ǳ"): "DZ",
    ord("ǲ"): "Dz",
    ord("ǳ"): "dz",
    ord("Ǆ"): "DŽ",
    ord("ǅ"): "Dž",
    ord("ǆ"): "dž",
    ord("Ǉ"): "LJ",
    ord("ǈ"): "Lj",
    ord("ǉ"): "lj",
    ord("Ǌ"): "NJ",
    ord("ǋ"): "Nj",
    ord("ǌ"): "nj",
    ord("ﬀ"): "ff",
    ord("ﬁ"): "fi",
    ord("ﬂ"): "fl",
    ord("ﬃ"): "ffi",
    ord("ﬄ"): "ffl",
    ord("ﬅ"): "ſt",
    ord("ﬆ"): "st",
}
_WIDTH = {0x3000: " "} | {
    i: unicodedata.normalize("NFKC", chr(i))
    for i in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(i)) != chr(i)
}
_CONTROL = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\u0085]")


def normalize_prompt(text: str) -> str:
    """Clean a prompt the way open_clip's ``SimpleTokenizer`` does before BPE (lower-casing aside).

    HTML entities are decoded, Latin ligatures split, full-width forms narrowed, curly quotes
    straightened, stray control characters dropped, Unicode NFC applied and whitespace collapsed.
    """
    if "<" not in text:  # ftfy decodes HTML entities first unless the text looks like markup
        text = html.unescape(text)
    text = text.translate(_LIGATURES).translate(_WIDTH)
    text = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', text))
    text = _LINE_BREAKS.sub("\n", text).translate(_CONTROL)
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


# --- loading -------------------------------------------------------------------------------------------------------


def _tokenizer_class() -> type:
    import transformers

    # transformers 4.x: CLIPTokenizerFast is the Rust-backed one; 5.x: CLIPTokenizer is (and the Fast name aliases it)
    return getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer


def _keep_pad_token_in_bpe(tokenizer: Any) -> None:
    """Stop the backend from splitting the pad token ``"!"`` out of prompts.

    transformers registers every special token, the pad token included, as an "added token" that is
    cut out of the raw text before BPE. With SD-2's pad token ``"!"`` (id 0, an ordinary vocabulary
    entry) that turns "brain!" into [brain</w>, 0] instead of open_clip's [brain</w>, !</w>=256]. The
    pad token keeps its id (0) for padding; only its entry in the backend's added-token list goes.
    """
    pad = tokenizer.pad_token
    backend = getattr(tokenizer, "_tokenizer", None)
    if pad is None or backend is None or pad in (tokenizer.bos_token, tokenizer.eos_token):
        return
    if pad not in backend.get_vocab(with_added_tokens=False):
        return  # a genuinely added token: leave it alone
    state = json.loads(backend.to_str())
    added = state.get("added_tokens") or []
    kept = [t for t in added if t.get("content") != pad]
    if len(kept) == len(added):
        return
    from tokenizers import Tokenizer

    state["added_tokens"] = kept
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    rewrap = getattr(tokenizer, "_wrap_decode_method_backend_tokenizer", None)
    if rewrap is not None:  # CLIP's decode fix-up ("</w>" -> " ") lives on the backend object
        rewrap()


def load_clip_tokenizer(path: str | Path) -> Any:
    """Load the CLIP tokenizer from a local directory (never from a hub).

    Args:
        path: a directory written by ``tools/build_clip_tokenizer.py`` (``vocab.json``,
            ``merges.txt``, ``tokenizer_config.json``), or any transformers CLIP tokenizer directory.

    Returns:
        A ``transformers.CLIPTokenizer`` (transformers 5) or ``CLIPTokenizerFast`` (transformers 4).

    Raises:
        FileNotFoundError: the directory or its vocabulary is missing; the message names the tool to run.
    """
    directory = Path(path)
    has_vocab = (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )
    if not directory.is_dir() or not has_vocab:
        what = "directory not found" if not directory.is_dir() else "no vocab.json + merges.txt (or tokenizer.json) in"
        raise FileNotFoundError(
            f"CLIP tokenizer {what} {str(directory)!r}. Build it offline from the vocabulary shipped in "
            f"open-clip-torch: pip install --no-deps open-clip-torch && {BUILD_COMMAND.format(path=directory)}"
        )
    tokenizer = _tokenizer_class().from_pretrained(str(directory), local_files_only=True)
    _keep_pad_token_in_bpe(tokenizer)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"CLIP tokenizer at {str(directory)!r} has no start/end tokens; rebuild it")
    return tokenizer


# --- prompts -------------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Content token ids (no start/end tokens, no truncation) of already validated strings."""
    if not texts:
        return []
    return list(tokenizer([normalize_prompt(t) for t in texts], add_special_tokens=False, verbose=False)["input_ids"])


def _check_string(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    reserved = [lit for lit in _RESERVED_LITERALS if lit in prompt.lower()]
    if reserved:
        raise PromptError(f"prompt contains the reserved token {reserved[0]!r}: {prompt!r}")


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str] | str, max_length: int = CLIP_CONTEXT_LENGTH, pad_id: int = PAD_ID
) -> tuple[torch.LongTensor, list[bool]]:
    """Tokenize prompts to fixed-length id rows, the way OpenCLIP and Stable Diffusion 2 do.

    Each row is ``[start, tokens..., end, pad, pad, ...]`` with padding id 0. A prompt longer than
    ``max_length`` keeps its first ``max_length - 2`` tokens and ends with the end token. An empty
    prompt gives ``[start, end, 0, ...]`` (the unconditional input of classifier-free guidance).

    Args:
        tokenizer: from :func:`load_clip_tokenizer`.
        prompts: strings (a single string is treated as a list of one).
        max_length: context length of the text encoder (77 for CLIP).
        pad_id: padding id; 0 for OpenCLIP / SD-2 text encoders.

    Raises:
        PromptError (a ValueError): a prompt is not a string or contains a literal start/end token.

    Returns:
        ``(ids, truncated)``: a ``(len(prompts), max_length)`` int64 tensor and, per prompt, whether
        it was truncated (so the caller can log "prompt truncated to 77 tokens").
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    for prompt in prompts:
        _check_string(prompt)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (start and end tokens), got {max_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.full((len(prompts), max_length), pad_id, dtype=torch.long)
    truncated: list[bool] = []
    for row, content in enumerate(_encode(tokenizer, list(prompts))):
        tokens = [bos, *content, eos]
        cut = len(tokens) > max_length
        if cut:
            tokens = tokens[: max_length - 1] + [eos]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        truncated.append(cut)
    return ids, truncated
