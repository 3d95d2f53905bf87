"""Build an offline CLIP tokenizer directory from the BPE vocabulary shipped in ``open-clip-torch``.

The OpenAI / OpenCLIP BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``) ships inside the
``open-clip-torch`` wheel. This tool reads that file (without importing ``open_clip``, whose
dependencies torchvision and timm are not needed) and writes a directory that
``transformers.CLIPTokenizer`` loads with ``local_files_only=True``:

- ``vocab.json``: token -> id, the same ids as ``open_clip.tokenizer.SimpleTokenizer``
  (256 byte-level characters, their 256 ``</w>`` variants, 48,894 merges, then
  ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407);
- ``merges.txt``: the merges, in rank order;
- ``tokenizer_config.json`` and ``special_tokens_map.json``: ``model_max_length`` 77 and
  Stable Diffusion 2 padding (pad token ``"!"``, id 0).

Usage::

    pip install --no-deps open-clip-torch   # only to build; not needed at run time
    python tools/build_clip_tokenizer.py [--output_dir bundles/brain_t1_ldm/models/tokenizer]
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

from common.io.atomic import atomic_path

REPO_ROOT = Path(__file__).resolve().parents[1]

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUTPUT_DIR = "bundles/brain_t1_ldm/models/tokenizer"

#: Same constants as ``open_clip.tokenizer.SimpleTokenizer``.
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # merges lines 1..48894 of the file (line 0 is a header)
BOS_TOKEN = "<|startoftext|>"  # open_clip calls it "<start_of_text>"; same id, 49406
EOS_TOKEN = "<|endoftext|>"  # open_clip calls it "<end_of_text>"; same id, 49407
BOS_ID = 49406
EOS_ID = 49407
PAD_TOKEN = "!"  # Stable Diffusion 2 / OpenCLIP pad with id 0, which is the byte token "!"
PAD_ID = 0
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2 / CLIP byte-level BPE table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def find_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` in the installed ``open-clip-torch`` package, without importing it."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open-clip-torch is not installed; it ships the CLIP BPE vocabulary this tool converts. "
            "Install it without its dependencies (torchvision/timm are not needed): "
            "pip install --no-deps open-clip-torch"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{BPE_FILENAME} not found in the open_clip package at {list(spec.submodule_search_locations)}; "
        "reinstall it: pip install --no-deps --force-reinstall open-clip-torch"
    )


def build_vocab_and_merges(bpe_path: str | Path) -> tuple[dict[str, int], list[str]]:
    """Return ``(vocab, merges)`` with exactly the ids of open_clip's ``SimpleTokenizer``."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merge_lines = lines[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not a CLIP BPE merges file (expected {NUM_MERGES} pairs after the header)")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if (
        len(vocab) != VOCAB_SIZE
        or vocab[BOS_TOKEN] != BOS_ID
        or vocab[EOS_TOKEN] != EOS_ID
        or vocab[PAD_TOKEN] != PAD_ID
    ):
        raise ValueError(f"unexpected CLIP vocabulary built from {bpe_path}: size {len(vocab)}")
    return vocab, [" ".join(m) for m in merges]


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` contents.

    Only ``<|startoftext|>`` and ``<|endoftext|>`` are registered as added tokens. The pad token
    ``"!"`` is named but deliberately NOT an added token: an added token is split out of the raw
    text before BPE, so "brain!" would encode "!" as id 0 instead of open_clip's "!</w>" (256).
    """
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "truncation_side": "right",
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "added_tokens_decoder": {
            str(BOS_ID): {**_special(BOS_TOKEN), "special": True},
            str(EOS_ID): {**_special(EOS_TOKEN), "special": True},
        },
    }


def special_tokens_map() -> dict:
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}


def _open_clip_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("open-clip-torch")
    except Exception:
        return None


def build(output_dir: str | None = None, bpe_path: str | None = None) -> str:
    """Convert the CLIP BPE vocabulary into a transformers ``CLIPTokenizer`` directory.

    Args:
        output_dir: where to write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` (and ``build_info.json``, the provenance); by default
            ``bundles/brain_t1_ldm/models/tokenizer`` in this repository.
        bpe_path: an explicit ``bpe_simple_vocab_16e6.txt.gz``; by default the one inside the
            installed ``open-clip-torch`` package.

    Returns:
        The output directory.
    """
    source = Path(bpe_path) if bpe_path else find_bpe_file()
    if not source.is_file():
        raise FileNotFoundError(f"BPE vocabulary file not found: {source}")
    out = Path(output_dir) if output_dir else REPO_ROOT / DEFAULT_OUTPUT_DIR
    vocab, merges = build_vocab_and_merges(source)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()

    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_tokens_map(), indent=2) + "\n",
        "build_info.json": json.dumps(
            {
                "source": f"{BPE_FILENAME} from open-clip-torch",
                "open_clip_torch_version": _open_clip_version() if not bpe_path else None,
                "source_sha256": sha,
                "built_by": "tools/build_clip_tokenizer.py",
                "ids": {"bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID, "vocab_size": VOCAB_SIZE},
            },
            indent=2,
        )
        + "\n",
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    total = sum((out / name).stat().st_size for name in files)
    print(f"wrote CLIP tokenizer ({len(vocab)} tokens, {len(merges)} merges, {total / 1e6:.2f} MB) to {out}")
    return str(out)


def cli() -> None:
    """Entry point of ``build-clip-tokenizer``."""
    import fire

    fire.Fire(build)


if __name__ == "__main__":
    cli()
