"""Attention of MONAI's networks through PyTorch's fused ``scaled_dot_product_attention`` (SDPA).

MONAI's ``SABlock`` and ``CrossAttentionBlock`` compute attention either with explicit einsums and a softmax, or,
with ``use_flash_attention``, with ``torch.nn.functional.scaled_dot_product_attention``: the same function, fused
(on a GPU, flash or memory-efficient kernels that never hold the full attention matrix). The switch is read at
every forward pass and changes no parameter, so it is an execution setting, not part of a network's architecture
record: weight files trained either way load either way.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import CrossAttentionBlock, SABlock


def default_sdpa() -> bool:
    """Whether networks are built with SDPA attention: where CUDA is available.

    On a GPU, SDPA's fused kernels never hold the attention matrix (the memory of full-size attention). On this
    project's CPU it is no gain (``docs/benchmarks.md``, "Attention"): 0.95-0.98x the einsums' time in float32,
    and 1.44x in bf16 training, whose CPU backward kernel is slow.
    """
    return torch.cuda.is_available()


def set_sdpa(network: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Route every MONAI attention block of ``network`` through SDPA (``enabled``) or MONAI's einsums; returns it.

    Blocks that keep their attention maps (``save_attn``) or add relative position embeddings are left alone
    (SDPA supports neither), and so are blocks with attention dropout: MONAI passes their rate to SDPA in eval mode
    too.
    """
    for module in network.modules():
        if isinstance(module, SABlock | CrossAttentionBlock):
            if module.save_attn or module.rel_positional_embedding is not None or module.dropout_rate > 0:
                continue
            module.use_flash_attention = bool(enabled)
    return network


def uses_sdpa(network: torch.nn.Module) -> bool:
    """Whether any attention block of ``network`` runs through SDPA."""
    return any(
        getattr(module, "use_flash_attention", False)
        for module in network.modules()
        if isinstance(module, SABlock | CrossAttentionBlock)
    )
