"""A CLIP image-text model for brain MRI slices: building, loading, and encoding images, captions and tokens.

The model is a transformers ``CLIPModel``, either

* pretrained, from a local directory (``CLIPModel.save_pretrained`` layout) or from a hub id pinned to a
  40-hex commit that is already in the local Hugging Face cache (nothing is downloaded at run time), or
* a small one built from a config (:func:`build_small_clip`), for demos and tests.

Any 3-channel CLIP serves: :class:`ClipImageAdapter` turns grayscale slices ``(B, 1, H, W)`` in [0, 1] into the
normalised 3-channel pixel values CLIP was trained on, and captions are tokenized with the project's offline
CLIP tokenizer (:mod:`common.networks.tokenizer`: OpenCLIP's BPE vocabulary, the one every CLIP with a
49408-token vocabulary uses). :class:`ClipEncoder` holds model, adapter and tokenizer; its ``forward`` is what a
MONAI ``SupervisedTrainer`` runs to fine-tune it contrastively (:mod:`common.engines.contrastive`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from common.networks.text_encoder import _COMMIT
from common.networks.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_clip_tokenizer, tokenize_prompts

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "ClipEncoder",
    "ClipImageAdapter",
    "build_small_clip",
    "clip_image_normalization",
    "clip_text_tower",
    "load_clip",
]

logger = logging.getLogger(__name__)

#: Per-channel (R, G, B) mean and standard deviation of OpenAI CLIP's preprocessing, the defaults of
#: transformers' ``CLIPImageProcessor``: (0.48145466, 0.4578275, 0.40821073) and (0.26862954, 0.26130258, 0.27577711).
CLIP_IMAGE_MEAN: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
CLIP_IMAGE_STD: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)


# --- building and loading ------------------------------------------------------------------------------------------


def build_small_clip(
    image_size: int = 64,
    patch_size: int = 8,
    vision_width: int = 64,
    vision_layers: int = 2,
    text_width: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    vocab_size: int = 49408,
    max_position_embeddings: int = 77,
    seed: int | None = None,
) -> CLIPModel:
    """A freshly initialised ``CLIPModel`` of the given size, built from a config (nothing is downloaded).

    The text tower uses the ids of the project's tokenizer (start 49406, end 49407, padding 0; see
    ``bundles/brain_t1_ldm/models/tokenizer/build_info.json``), so its pooled output is read at the end token.
    MLP widths are 4x the tower widths, as in CLIP; the learnable temperature starts at CLIP's ``ln(1 / 0.07)``.

    Args:
        image_size, patch_size: input side of the vision tower and its patch side (``image_size % patch_size == 0``).
        vision_width, vision_layers, text_width, text_layers, heads: tower widths, depths and attention heads
            (``heads`` divides both widths).
        projection_dim: size ``D`` of the joint embedding space.
        vocab_size, max_position_embeddings: text vocabulary and context length (CLIP's 49408 and 77).
        seed: seeds the initialisation (without touching torch's global RNG state); ``None`` uses the global RNG.
    """
    if image_size % patch_size:
        raise ValueError(f"`image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size}).")
    for width in (vision_width, text_width):
        if width % heads:
            raise ValueError(f"`heads` ({heads}) must divide the tower widths ({vision_width}, {text_width}).")
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_position_embeddings,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "projection_dim": projection_dim,
    }
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": 4 * vision_width,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": heads,
        "num_channels": 3,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": projection_dim,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    if seed is None:
        return CLIPModel(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config)


def load_clip(path_or_none: str | Path | None, revision: str | None = None, **small_args: Any) -> CLIPModel:
    """The CLIP to fine-tune or to encode with: pretrained when ``path_or_none`` is given, else a small new one.

    Args:
        path_or_none: a local directory written by ``CLIPModel.save_pretrained``; or a hub id, which must be
            pinned with ``revision`` and already be in the local Hugging Face cache; or ``None`` / ``""`` for
            :func:`build_small_clip`.
        revision: the 40-hex commit of a hub id (ignored for a local directory).
        small_args: arguments of :func:`build_small_clip`, used only when no pretrained CLIP is given (the
            small CLIP then records its architecture, ``common.networks.architecture``, so that its exported
            weights rebuild it).

    Raises:
        ValueError: a hub id without a 40-hex ``revision`` (an unpinned name can change or vanish).
        FileNotFoundError: a pinned hub id that is not in the local cache.
    """
    if not path_or_none:
        from common.networks.architecture import build_network  # the registry imports this module

        return build_network("CLIPModel", **small_args)  # records its architecture for the exported weights
    if small_args:
        logger.info("Loading the pretrained CLIP %s: the size arguments %s are not used.", path_or_none, small_args)
    path = Path(path_or_none)
    if path.is_dir():
        return CLIPModel.from_pretrained(path, local_files_only=True)
    source = str(path_or_none)
    if revision is None or not _COMMIT.match(revision):
        raise ValueError(
            f"CLIP model '{source}' is neither a local directory nor pinned: give its `revision` as the "
            "40-character commit hash of the hub repository (an unpinned name can change or vanish)."
        )
    try:
        return CLIPModel.from_pretrained(source, revision=revision, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"CLIP model '{source}'@{revision} is not in the local Hugging Face cache. Fetch it once with "
            f"`huggingface-cli download {source} --revision {revision}` on a machine with network access, "
            "or point the CLIP path at a local directory."
        ) from err


def clip_text_tower(model: CLIPModel) -> CLIPTextModel:
    """The text tower of ``model`` (its ``CLIPTextModel``, the same module), with its architecture recorded.

    A text-to-image bundle conditions on this tower's token states (``common.networks.text_encoder``); exported by
    ``WeightsExporter``, the file rebuilds the tower alone, without the vision tower. Being the same module, the
    tower seen at export time holds the weights trained up to then.

    Raises:
        ValueError: the tower uses an activation or layer-norm epsilon that the recorded architecture
            (``build_clip_text_model``, CLIP's defaults) would not rebuild; save such a model with
            ``save_pretrained`` and pass its folder as ``text_encoder`` instead.
    """
    from common.networks.architecture import NetworkArchitecture  # the registry imports this module

    text = model.config.text_config
    architecture = NetworkArchitecture(
        "CLIPTextModel",
        {
            "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "intermediate_size": text.intermediate_size,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
        },
    )
    rebuilt = architecture.build()
    for key in ("hidden_act", "layer_norm_eps"):
        if getattr(rebuilt.config, key) != getattr(text, key):
            raise ValueError(
                f"The CLIP text tower has {key}={getattr(text, key)!r}, which a recorded CLIPTextModel "
                f"({getattr(rebuilt.config, key)!r}) cannot rebuild: save it with save_pretrained and load the folder."
            )
    if isinstance(model.text_model, CLIPTextModel):  # transformers 5
        tower = model.text_model
        tower.architecture = architecture
    else:  # transformers 4: the CLIPModel holds the bare transformer that CLIPTextModel wraps
        tower = rebuilt
        tower.text_model = model.text_model
    return tower


def clip_image_normalization(path_or_none: str | Path | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel that a CLIP expects of its pixel values.

    Read from ``preprocessor_config.json`` (``image_mean``, ``image_std``) in a local CLIP directory that has
    one (some OpenCLIP conversions use other statistics); otherwise OpenAI CLIP's :data:`CLIP_IMAGE_MEAN` and
    :data:`CLIP_IMAGE_STD`.
    """
    if path_or_none:
        config_file = Path(path_or_none) / "preprocessor_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            if "image_mean" in config and "image_std" in config:
                return tuple(map(float, config["image_mean"])), tuple(map(float, config["image_std"]))
    return CLIP_IMAGE_MEAN, CLIP_IMAGE_STD


# --- images --------------------------------------------------------------------------------------------------------


class ClipImageAdapter(nn.Module):
    """Grayscale slices ``(B, 1, H, W)`` in [0, 1] -> CLIP pixel values ``(B, 3, S, S)``.

    A non-square slice is first padded to a square with zeros (black background, so no anatomy is cropped
    away, unlike CLIP's centre crop); the square is resized to ``S = image_size`` with antialiased bicubic
    interpolation (CLIP's resampling filter) and clamped back to [0, 1]; the one channel is repeated to R, G, B
    and each channel normalised with ``(x - mean) / std``. A 3-channel input skips the repetition.

    Args:
        image_size: the vision tower's input side (``model.config.vision_config.image_size``).
        mean, std: per-channel statistics; OpenAI CLIP's by default (:data:`CLIP_IMAGE_MEAN`, :data:`CLIP_IMAGE_STD`).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = CLIP_IMAGE_MEAN,
        std: Sequence[float] = CLIP_IMAGE_STD,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"`mean` and `std` need one value per RGB channel, got {list(mean)} and {list(std)}.")
        self.image_size = int(image_size)
        # not persistent: constants of the preprocessing, not weights
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(images, MetaTensor):
            images = images.as_tensor()
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Expected images of shape (B, 1, H, W) or (B, 3, H, W), got {tuple(images.shape)}.")
        x = images.to(self.mean.dtype) if not images.is_floating_point() else images
        height, width = x.shape[-2:]
        if height != width:
            side = max(height, width)
            top, left = (side - height) // 2, (side - width) // 2
            x = F.pad(x, (left, side - width - left, top, side - height - top))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots at edges
        x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# --- the encoder ---------------------------------------------------------------------------------------------------


def _pooled(output: Any) -> torch.Tensor:
    """The projected embedding of ``get_*_features``: a tensor in transformers 4, an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoder(nn.Module):
    """CLIP model + image adapter + tokenizer: slices and captions -> unit-norm embeddings in CLIP's joint space.

    ``forward(images, captions)`` returns ``(image_emb, text_emb, logit_scale)``, the inputs of
    :func:`common.engines.contrastive.clip_contrastive_loss`; as a ``SupervisedTrainer``'s network, with
    ``ClipPrepareBatch`` and ``ClipContrastiveLoss``, it fine-tunes both towers and the temperature.

    Args:
        model: a transformers ``CLIPModel`` (:func:`load_clip`).
        tokenizer: a tokenizer from ``load_clip_tokenizer``, or the path of a local tokenizer directory.
        image_mean, image_std: pixel statistics of the model (:func:`clip_image_normalization`); OpenAI's by default.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Any,
        image_mean: Sequence[float] = CLIP_IMAGE_MEAN,
        image_std: Sequence[float] = CLIP_IMAGE_STD,
    ) -> None:
        super().__init__()
        if isinstance(tokenizer, str | Path):
            tokenizer = load_clip_tokenizer(tokenizer)
        vocab = model.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens, more than the CLIP text vocabulary ({vocab})."
            )
        if model.config.vision_config.num_channels != 3:
            raise ValueError(f"Expected a 3-channel CLIP, got {model.config.vision_config.num_channels} channels.")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = ClipImageAdapter(model.config.vision_config.image_size, image_mean, image_std)
        self.context_length = model.config.text_config.max_position_embeddings
        self._warned_truncation = False

    @property
    def embedding_dim(self) -> int:
        """``D``, the size of the joint embeddings."""
        return self.model.config.projection_dim

    @property
    def text_width(self) -> int:
        """Width of the text tower's token states (:meth:`text_tokens`)."""
        return self.model.config.text_config.hidden_size

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable log temperature (``exp`` of it multiplies cosine similarities)."""
        return self.model.logit_scale

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(ids, mask)``: ids ``(B, L)`` on the model's device, bool mask True from start to end token."""
        if isinstance(captions, str):
            raise TypeError("`captions` must be a sequence of strings, not one string.")
        ids, truncated = tokenize_prompts(self.tokenizer, list(captions), max_length=self.context_length)
        if any(truncated) and not self._warned_truncation:  # once: training sees the same captions every epoch
            self._warned_truncation = True
            first = next(c for c, cut in zip(captions, truncated, strict=True) if cut)
            logger.warning("Captions truncated to %d CLIP tokens (warned once), e.g. %r", self.context_length, first)
        ids = ids.to(self.model.logit_scale.device)
        end = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= end
        return ids, mask

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Slices ``(B, 1, H, W)`` in [0, 1] -> unit-norm image embeddings ``(B, D)``."""
        pixels = self.adapter(images.to(self.model.logit_scale.device))
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions (``B`` strings) -> unit-norm text embeddings ``(B, D)`` (pooled at the end token)."""
        ids, _ = self.tokenize(captions)
        return F.normalize(_pooled(self.model.get_text_features(input_ids=ids)), dim=-1)

    def text_tokens(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> per-token states ``(B, 77, text_width)`` (after the final layer norm) and mask ``(B, 77)``.

        The mask is True for real tokens (start token to end token) and False for padding, as
        ``DiffusionPrior(text_tokens=, text_mask=)`` takes them. No attention mask enters the text tower, as in
        CLIP's training: its causal attention keeps padding out of every real token's state anyway.
        """
        ids, mask = self.tokenize(captions)
        return self.model.text_model(input_ids=ids).last_hidden_state, mask

    def forward(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, nn.Parameter]:
        """``(image_emb (B, D), text_emb (B, D), logit_scale)``: unit-norm embeddings and the log temperature."""
        return self.encode_images(images), self.encode_texts(captions), self.model.logit_scale
