"""LoRA adapters on a frozen base network: the cross-attention of a diffusion UNet, the attention of a CLIP text tower.

A LoRA adapter adds a trainable low-rank update ``(alpha / rank) * B @ A`` beside chosen ``Linear`` layers of a frozen
network (:func:`add_lora`, built on peft's ``inject_adapter_in_model``). Only the adapter tensors are saved
(:func:`save_lora`), with what re-creates them (:class:`LoRASettings`) and a fingerprint of the base weights::

    {"lora": {name: tensor}, "lora_settings": {"rank": 8, "alpha": 8, ...}, "base_fingerprint": "ab12...",
     "provenance": {...}}

so an adapter file is small and is refused on any base network other than the one it was trained on
(:func:`load_lora`): an adapter learned on other weights changes them in ways nobody trained.

Typical use in configs: ``"$common.networks.lora.add_lora(@unet, @lora_settings)"`` with
``target_modules: "$common.networks.lora.cross_attention_targets(@unet)"`` for training, and
``"$common.networks.lora.load_lora(@lora_path, @unet)"`` at inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks import CrossAttentionBlock
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.models.clip.modeling_clip import CLIPAttention

from common.io.atomic import atomic_path
from common.io.provenance import PROVENANCE_KEY
from common.io.weights import load_weights, state_fingerprint

#: Networks an adapter can be trained on (the ``base`` of :class:`LoRASettings`).
LORA_BASES = ("unet", "text_encoder")

#: Projection layers of MONAI's ``CrossAttentionBlock`` (``attn2`` of a ``DiffusionModelUNet`` transformer block).
CROSS_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "out_proj")

#: Projection layers of a transformers ``CLIPAttention`` (``self_attn`` of each CLIP text encoder layer).
CLIP_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

# peft's name of the single adapter a network carries here; files store keys without it.
_ADAPTER = "default"


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a ``DistributedDataParallel`` wrapper (training exports through one)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def _projections(network: torch.nn.Module, block: type[torch.nn.Module], names: tuple[str, ...]) -> list[str]:
    """Full module names of the ``Linear`` children called ``names`` of every ``block`` module of ``network``.

    A layer already wrapped by an adapter still counts: the targets are a property of the architecture.
    """
    return [
        f"{block_name}.{name}" if block_name else name
        for block_name, module in network.named_modules()
        if isinstance(module, block)
        for name in names
        if isinstance(getattr(module, name, None), torch.nn.Linear | BaseTunerLayer)
    ]


def cross_attention_targets(network: torch.nn.Module) -> list[str]:
    """Full names of the query, key, value and output projections of a MONAI ``DiffusionModelUNet``'s cross-attention.

    These are ``to_q``, ``to_k``, ``to_v`` and ``out_proj`` of every ``CrossAttentionBlock`` (``attn2`` of each
    transformer block); self-attention (``attn1``) is left alone: cross-attention is where text conditions the image.

    Raises:
        ValueError: ``network`` has no cross-attention (built without conditioning or attention levels).
    """
    targets = _projections(network, CrossAttentionBlock, CROSS_ATTENTION_PROJECTIONS)
    if not targets:
        raise ValueError(
            f"{type(network).__name__} has no cross-attention layers to adapt: a DiffusionModelUNet has them only when "
            "built with with_conditioning=True and at least one True in attention_levels."
        )
    return targets


def text_attention_targets(text_model: torch.nn.Module) -> list[str]:
    """Full names of the ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` layers of a CLIP text model's attention.

    Raises:
        ValueError: ``text_model`` has no CLIP attention layer.
    """
    targets = _projections(text_model, CLIPAttention, CLIP_ATTENTION_PROJECTIONS)
    if not targets:
        raise ValueError(
            f"{type(text_model).__name__} has no CLIP attention layers to adapt: give a transformers CLIPTextModel."
        )
    return targets


@dataclass(frozen=True)
class LoRASettings:
    """What re-creates an adapter: its rank, scale ``alpha`` (the update is ``alpha / rank * B @ A``), dropout on the
    adapter's input, the adapted modules, and which network it adapts (``"unet"`` or ``"text_encoder"``).

    ``target_modules`` are module names as peft matches them: a full name, or a suffix after a dot.
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    base: str = "unet"

    def __post_init__(self) -> None:
        # configs and files give lists; a tuple keeps the settings hashable and immutable
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoRA target_modules must be non-empty module names, got {self.target_modules!r}.")
        if self.base not in LORA_BASES:
            raise ValueError(f"LoRA base must be one of {LORA_BASES}, got {self.base!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a list of targets), so the record survives ``weights_only`` loading."""
        record = asdict(self)
        record["target_modules"] = list(self.target_modules)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> LoRASettings:
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not isinstance(record, Mapping) or not required <= set(record) <= known:
            raise ValueError(f"Not LoRA settings (fields {sorted(known)}, required {sorted(required)}): {record!r}.")
        return cls(**record)

    def peft_config(self) -> LoraConfig:
        """The peft ``LoraConfig`` of these settings."""
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules)
        )


def _lora_layers(network: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """``{name: layer}`` of the peft layers wrapping base layers of ``network``."""
    return {name: module for name, module in network.named_modules() if isinstance(module, BaseTunerLayer)}


def has_lora(network: torch.nn.Module) -> bool:
    """Whether ``network`` carries LoRA adapters (added and not merged)."""
    return bool(_lora_layers(_unwrap(network)))


def add_lora(network: torch.nn.Module, settings: LoRASettings) -> torch.nn.Module:
    """Wrap the ``settings.target_modules`` layers of ``network`` with LoRA adapters, in place; return ``network``.

    Every base parameter is frozen (``requires_grad=False``): peft's injection freezes all but the adapters, so an
    optimiser over ``network.parameters()`` trains the adapters only (frozen parameters get no gradient). The
    ``B`` matrices start at zero, so the adapted network computes exactly the base function until trained.

    Raises:
        ValueError: ``network`` already carries adapters, or no module matches ``settings.target_modules``.
    """
    if has_lora(network):
        raise ValueError(f"{type(network).__name__} already carries LoRA adapters; add them to a plain base network.")
    return inject_adapter_in_model(settings.peft_config(), network, adapter_name=_ADAPTER)


def lora_base_fingerprint(network: torch.nn.Module) -> str:
    """Fingerprint of the base weights of ``network``, the same before and after :func:`add_lora`.

    It is ``common.io.weights.state_fingerprint`` of the base state dict (adapter tensors left out, peft's
    ``base_layer`` level removed from the names): for an unadapted network it is the fingerprint the project
    already records, ``common.networks.pairing.fingerprint("text_encoder", ...)`` for a text encoder and a
    ControlNet's ``base_model`` record for a UNet. Merging adapters changes it.
    """
    network = _unwrap(network)
    wrapped = tuple(f"{name}." for name in _lora_layers(network))
    base = {}
    for key, tensor in network.state_dict().items():
        owner = next((prefix for prefix in wrapped if key.startswith(prefix)), None)
        if owner is None:
            base[key] = tensor
        elif key.startswith(f"{owner}base_layer."):
            base[owner + key.removeprefix(f"{owner}base_layer.")] = tensor
    return state_fingerprint(base)


def lora_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``network`` only (peft's names without the adapter name), detached copies.

    Raises:
        ValueError: ``network`` carries no adapter.
    """
    network = _unwrap(network)
    if not has_lora(network):
        raise ValueError(f"{type(network).__name__} carries no LoRA adapter: call add_lora first.")
    return {
        key: tensor.detach().clone()
        for key, tensor in get_peft_model_state_dict(network, adapter_name=_ADAPTER).items()
    }


def _matches(name: str, target: str) -> bool:
    """Whether module ``name`` is matched by peft target ``target`` (the full name, or a suffix after a dot)."""
    return name == target or name.endswith(f".{target}")


def _check_settings(network: torch.nn.Module, settings: LoRASettings) -> None:
    """Refuse settings other than those the adapters of ``network`` were made with: they would re-create others.

    Targets are compared by the layers they adapt: peft shortens a long target list to common suffixes.
    """
    config = network.peft_config[_ADAPTER]
    made = (config.r, config.lora_alpha, config.lora_dropout)
    given = (settings.rank, settings.alpha, settings.dropout)
    adapted = set(_lora_layers(network))
    targeted = {name for name in adapted if any(_matches(name, t) for t in settings.target_modules)}
    unmatched = [t for t in settings.target_modules if not any(_matches(name, t) for name in adapted)]
    if made != given or targeted != adapted or unmatched:
        raise ValueError(
            f"The settings given (rank, alpha, dropout = {given}, targets {list(settings.target_modules)}) are not "
            f"those the network's adapters were made with ({made}, adapting {sorted(adapted)}); save the settings "
            "passed to add_lora."
        )


def save_lora(
    path: str | Path,
    network: torch.nn.Module,
    settings: LoRASettings,
    base_fingerprint: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the adapters of ``network`` to ``path`` (atomically), with their settings and base fingerprint.

    Args:
        path: the adapter file (``.pt``).
        network: a network adapted with :func:`add_lora` (a ``DistributedDataParallel`` wrapper is looked through).
        settings: those given to :func:`add_lora`.
        base_fingerprint: the base weights the adapter belongs to; by default :func:`lora_base_fingerprint` of
            ``network`` (its base weights are frozen, so they are still those it started from).
        provenance: where the adapter comes from (e.g. ``{"demo": True}``), saved under ``"provenance"``.

    Raises:
        ValueError: ``network`` carries no adapter, or ``settings`` are not those it was adapted with.
    """
    state = lora_state(network)
    _check_settings(_unwrap(network), settings)
    record = {
        "lora": state,
        "lora_settings": settings.to_dict(),
        "base_fingerprint": base_fingerprint or lora_base_fingerprint(network),
        PROVENANCE_KEY: dict(provenance or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return Path(path)


def load_lora(
    path: str | Path, network: torch.nn.Module, sha256: str | None = None, how_to_get: str = ""
) -> torch.nn.Module:
    """Add the adapter saved at ``path`` to the base ``network`` (in place, frozen as by :func:`add_lora`); return it.

    The file is read safely (``common.io.weights.load_weights``: ``weights_only``, optional ``sha256``).

    Raises:
        ValueError: not an adapter file, or ``network`` is not the base network the adapter was trained on (the
            message names both fingerprints), or its adapter tensors do not fit.
    """
    weights = load_weights(path, sha256=sha256, how_to_get=how_to_get)
    if missing := [key for key in ("lora", "lora_settings", "base_fingerprint") if key not in weights]:
        raise ValueError(f"{path} is not a LoRA adapter file: it lacks {missing} (it holds {sorted(weights)}).")
    settings = LoRASettings.from_dict(weights["lora_settings"])
    recorded, given = weights["base_fingerprint"], lora_base_fingerprint(network)
    if recorded != given:
        raise ValueError(
            f"{path} adapts another {settings.base}: its base weights have fingerprint {recorded[:12]}, the network "
            f"given has {given[:12]}. An adapter only makes sense on the base weights it was trained on: load the "
            f"{settings.base} it was trained with."
        )
    add_lora(network, settings)
    expected = set(lora_state(network))
    if expected != set(weights["lora"]):
        raise ValueError(
            f"{path} holds adapter tensors {sorted(set(weights['lora']) ^ expected)} that its settings do not create "
            "(or lacks them): the file is damaged."
        )
    set_peft_model_state_dict(network, weights["lora"], adapter_name=_ADAPTER)
    return network


def merge_lora(network: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights and remove them, in place; return ``network``.

    The result is a plain network of the base architecture (its state dict loads into a fresh base network) that
    computes the adapted function without the adapters' extra matrix products: faster inference. Its base
    fingerprint is no longer the base's, so an adapter cannot be loaded onto it a second time.

    Raises:
        ValueError: ``network`` carries no adapter.
    """
    layers = _lora_layers(network)
    if not layers:
        raise ValueError(f"{type(network).__name__} carries no LoRA adapter to merge.")
    for name, layer in layers.items():
        layer.merge(adapter_names=[_ADAPTER])
        network.set_submodule(name, layer.get_base_layer())
    del network.peft_config  # peft's record of the adapters, which are gone
    return network
