"""Convert old ``monai-generative`` state dicts (MONAI Model Zoo generative bundles) into MONAI-core networks.

The zoo's ``cxr_image_synthesis_latent_diffusion_model`` ships ``models/autoencoder.pth`` and
``models/diffusion_model.pth``: bare state dicts of ``generative.networks.nets.AutoencoderKL`` and
``DiffusionModelUNet`` (``monai-generative``, archived). MONAI core holds the same networks, with some modules
renamed, and its ``load_old_state_dict`` maps the old names onto the new ones. It is right except for one thing:

**The old self-attention block never applied its output projection.** ``generative``'s ``AttentionBlock`` (the
spatial self-attention of the autoencoder, and of an unconditioned UNet) creates ``proj_attn = nn.Linear(C, C)`` but
its ``forward`` returns ``attention(q, k, v) + residual`` without it, so ``*.proj_attn.*`` are untrained random
values that never touched an output. MONAI 1.6.1 copies them into ``attn.out_proj``, which the new block *does*
apply: the converted network then computes something else, silently. (The UNet's cross-attention blocks are not
affected: there the old ``to_out.0`` was applied, and maps onto ``out_proj`` rightly.)

So :func:`load_old_weights` first rewrites each such projection as what it was in effect, the identity: it is removed
when the new block has no output projection (``include_fc=False``, the default this module chooses for networks
that have old self-attention blocks, so that the converted network has exactly the parameters the old one used) and
set to the identity matrix and zero bias when the caller asks for ``include_fc=True``. Then MONAI's own mapping runs,
and the result is checked: every old key must have been used, and every new parameter set from the old state dict.

The full-size architecture of the zoo CXR model, its latent scale factor and noise schedule are
:data:`CXR_AUTOENCODER_ARGS`, :data:`CXR_UNET_ARGS`, :data:`CXR_SCALE_FACTOR` and :data:`CXR_SCHEDULER`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.blocks import SpatialAttentionBlock

from common.networks.architecture import build_network

logger = logging.getLogger(__name__)

#: The zoo bundle these constants describe (``configs/metadata.json`` version 1.0.0, ``monai-generative`` model zoo).
CXR_ZOO_BUNDLE = "cxr_image_synthesis_latent_diffusion_model"
CXR_ZOO_BUNDLE_VERSION = "1.0.0"

#: ``autoencoder_def`` of the zoo bundle's ``configs/inference.json``, in MONAI-core argument names. Images are
#: 1x512x512 in [0, 1]; latents 3x64x64.
CXR_AUTOENCODER_ARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 3,
    "channels": [64, 128, 128, 128],
    "num_res_blocks": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [False, False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}

#: ``diffusion_def`` of the same config: conditioned on 77x1024 embeddings of the SD-2.1-base CLIP text tower.
CXR_UNET_ARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 3,
    "channels": [256, 512, 768],
    "num_res_blocks": 2,
    "attention_levels": [False, True, True],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "resblock_updown": False,
    "num_head_channels": [0, 512, 768],
    "with_conditioning": True,
    "transformer_num_layers": 1,
    "cross_attention_dim": 1024,
}

#: Latents are multiplied by it before diffusion: the default of ``scripts/sampler.py``'s ``sampling_fn``, which the
#: zoo config does not override (it decodes ``noise / scale_factor``).
CXR_SCALE_FACTOR = 0.3

#: The config's ``scheduler`` (a DDIM with ``clip_sample: false``, 50 inference steps, on this training schedule).
CXR_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0205,
    "prediction_type": "v_prediction",
}

#: ``monai-generative`` constructor arguments that MONAI core renamed.
RENAMED_ARGS = {"num_channels": "channels", "use_checkpointing": "use_checkpoint"}

#: Key fragments that only MONAI-core state dicts have (renamed modules): such a dict needs no conversion.
_CORE_ONLY_KEY_PARTS = (".attn.to_q.", ".attn.out_proj.", ".postconv.")

_DEAD_PROJECTION = "proj_attn"


class ConversionError(ValueError):
    """Old weights that cannot be converted exactly: foreign file, missing or unused keys, other architecture."""


def core_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI-core constructor arguments from ``monai-generative`` ones (``num_channels`` -> ``channels``, ...).

    Arguments already in MONAI-core names pass unchanged, and so does a config's ``_target_`` being left out.
    """
    return {RENAMED_ARGS.get(name, name): value for name, value in args.items() if not name.startswith("_")}


def check_old_state_dict(state: Any, source: str = "the state dict") -> dict[str, torch.Tensor]:
    """``state`` if it is a bare old-format state dict (``{name: tensor}``); a clear :class:`ConversionError` if not.

    Refused: a file already in this project's format (``{"autoencoder": {...}, "architectures": ...}``), any other
    checkpoint that nests its state dict, and a MONAI-core state dict (already converted).
    """
    if not isinstance(state, Mapping):
        raise ConversionError(f"{source} holds a {type(state).__name__}, not an old monai-generative state dict.")
    nested = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if nested:
        raise ConversionError(
            f"{source} is not an old monai-generative state dict (a flat {{name: tensor}} dict): it holds the entries "
            f"{nested}. A file in this project's format (entries such as 'autoencoder', 'unet', 'architectures') is "
            "already converted: load it with common.networks.architecture.load_network; it needs no import."
        )
    if core_keys := [k for k in state if any(part in k for part in _CORE_ONLY_KEY_PARTS)]:
        raise ConversionError(
            f"{source} is already a MONAI-core state dict (it has {core_keys[0]!r}, a name monai-generative never "
            "used): load it with load_state_dict; it needs no import."
        )
    return dict(state)


def has_dead_projections(old_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the old network had self-attention blocks (whose ``proj_attn`` was never applied)."""
    return any(f".{_DEAD_PROJECTION}." in key for key in old_state)


def self_attention_blocks(network: torch.nn.Module) -> dict[str, SpatialAttentionBlock]:
    """``{module name: block}`` of the new network's spatial self-attention blocks, the old ``AttentionBlock``'s heirs."""
    return {name: m for name, m in network.named_modules() if isinstance(m, SpatialAttentionBlock)}


def resolve_dead_projections(
    network: torch.nn.Module, old_state: Mapping[str, torch.Tensor], source: str = "the state dict"
) -> dict[str, torch.Tensor]:
    """A copy of ``old_state`` where each old ``proj_attn`` says what it did: nothing.

    For each self-attention block of ``network`` (say ``encoder.blocks.3``), the old ``encoder.blocks.3.proj_attn.*``
    (``(C, C)`` weight, ``(C,)`` bias) are removed when the new block has no output projection, and replaced by the
    identity matrix and a zero bias when it has one, which MONAI's ``load_old_state_dict`` then copies into
    ``attn.out_proj``. Any old ``proj_attn`` left over means the architecture has fewer attention blocks than the
    weights; it is kept so that the unused-key check names it.

    Raises:
        ConversionError: the architecture has an attention block whose ``proj_attn`` the old state dict lacks.
    """
    state = dict(old_state)
    for name, block in self_attention_blocks(network).items():
        weight_key, bias_key = f"{name}.{_DEAD_PROJECTION}.weight", f"{name}.{_DEAD_PROJECTION}.bias"
        for key in (weight_key, bias_key):
            if key not in state:
                raise ConversionError(
                    f"{source} lacks {key!r}: the architecture has a self-attention block '{name}' that the old "
                    "weights do not have (wrong architecture arguments, or a damaged file)."
                )
        weight, bias = state.pop(weight_key), state.pop(bias_key)
        if block.attn.include_fc:
            state[weight_key] = torch.eye(weight.shape[0], dtype=weight.dtype)
            state[bias_key] = torch.zeros_like(bias)
    return state


def _fill_with_nan(network: torch.nn.Module) -> None:
    """Set every floating-point parameter and buffer to NaN, so that whatever the loading leaves unset shows."""
    with torch.no_grad():
        for tensor in network.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))


def _unset_keys(network: torch.nn.Module) -> list[str]:
    """Keys of ``network`` still holding NaN after :func:`_fill_with_nan` and loading."""
    return [k for k, t in network.state_dict().items() if t.is_floating_point() and bool(torch.isnan(t).any())]


def check_shared_shapes(network: torch.nn.Module, old_state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ConversionError` naming the first key (in module order) that both have with different shapes."""
    for key, tensor in network.state_dict().items():
        if key in old_state and old_state[key].shape != tensor.shape:
            raise ConversionError(
                f"{source} does not fit the architecture: first mismatching key {key!r} has shape "
                f"{tuple(old_state[key].shape)} in the old weights and {tuple(tensor.shape)} in the architecture "
                f"{getattr(network, 'architecture', None)}."
            )


def _first_load_error(err: RuntimeError) -> str:
    """The most telling line of a ``load_state_dict`` error: the first size mismatch, else the first complaint."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    mismatches = [line for line in lines if line.startswith("size mismatch")]
    return (mismatches or lines or [str(err)])[0]


def _shorten(keys: list[str], limit: int = 8) -> str:
    """``'a', 'b', ... (n in all)`` for error messages."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys)} in all)"


def load_old_weights(
    network: torch.nn.Module, old_state: Mapping[str, torch.Tensor], source: str = "the state dict"
) -> torch.nn.Module:
    """Load an old ``monai-generative`` state dict into a MONAI-core ``AutoencoderKL`` or ``DiffusionModelUNet``.

    Dead ``proj_attn`` projections are resolved first (:func:`resolve_dead_projections`), then MONAI's
    ``network.load_old_state_dict`` maps the names. ``old_state`` itself is not changed. Returns ``network``; when
    loading fails, ``network`` is left holding NaN, never half-loaded weights that look usable.

    Raises:
        ConversionError: ``old_state`` is not an old state dict, an old key was not used, a parameter of ``network``
            was not set from ``old_state``, or a shape differs (the first mismatching key and both shapes are named).
    """
    old_state = check_old_state_dict(old_state, source)
    check_shared_shapes(network, old_state, source)
    remaining = resolve_dead_projections(network, old_state, source)
    new_keys = set(network.state_dict())
    _fill_with_nan(network)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints "All keys match" on its fast path
            network.load_old_state_dict(remaining)  # pops what it uses from ``remaining``
    except KeyError as err:
        raise ConversionError(
            f"{source} lacks {err.args[0]!r}, which the architecture needs (wrong architecture arguments, or a damaged "
            "file)."
        ) from err
    except RuntimeError as err:
        raise ConversionError(f"{source} does not fit the architecture: {_first_load_error(err)}") from err
    # On MONAI's fast path (every old name is a new name) nothing is popped; the names left are then all new names.
    if unused := [k for k in remaining if k not in new_keys]:
        raise ConversionError(
            f"{source} has weights that the architecture does not use: {_shorten(unused)} (wrong architecture "
            "arguments?). Nothing is dropped silently."
        )
    if unset := _unset_keys(network):
        raise ConversionError(
            f"{source} lacks weights for {_shorten(unset)} of the architecture (a missing key, or wrong architecture "
            "arguments); they would stay randomly initialised."
        )
    return network


def _with_projection_choice(args: Mapping[str, Any], old_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``args`` in MONAI-core names, with ``include_fc=False`` when the old network had dead projections and the
    caller did not choose: the converted self-attention then has exactly the parameters the old one applied."""
    args = core_args(args)
    if has_dead_projections(old_state):
        args.setdefault("include_fc", False)
    return args


def autoencoder_from_old(
    old_state: Mapping[str, torch.Tensor], args: Mapping[str, Any], source: str = "the autoencoder state dict"
) -> torch.nn.Module:
    """A MONAI-core ``AutoencoderKL`` (built by ``build_network``, so it carries its architecture record) holding the
    weights of an old ``generative.networks.nets.AutoencoderKL`` state dict.

    Args:
        old_state: the old state dict (e.g. the zoo's ``models/autoencoder.pth``).
        args: constructor arguments, in MONAI-core or ``monai-generative`` names (e.g. :data:`CXR_AUTOENCODER_ARGS`).
        source: how errors name the weights (a file path).
    """
    old_state = check_old_state_dict(old_state, source)
    network = build_network("AutoencoderKL", **_with_projection_choice(args, old_state))
    return load_old_weights(network, old_state, source).eval()


def unet_from_old(
    old_state: Mapping[str, torch.Tensor], args: Mapping[str, Any], source: str = "the diffusion model state dict"
) -> torch.nn.Module:
    """A MONAI-core ``DiffusionModelUNet`` (built by ``build_network``) holding the weights of an old
    ``generative.networks.nets.DiffusionModelUNet`` state dict; ``args`` as for :func:`autoencoder_from_old`
    (e.g. :data:`CXR_UNET_ARGS`)."""
    old_state = check_old_state_dict(old_state, source)
    network = build_network("DiffusionModelUNet", **_with_projection_choice(args, old_state))
    return load_old_weights(network, old_state, source).eval()
