"""common.networks.attention: MONAI attention through SDPA gives the same outputs and gradients."""

from __future__ import annotations

import copy

import torch
from monai.networks.blocks import SABlock

from common.networks.architecture import build_network
from common.networks.attention import set_sdpa, uses_sdpa
from tests.common.networks.test_architecture import UNET_ARGS


def test_sdpa_where_cuda_is_available(monkeypatch):
    assert not uses_sdpa(build_network("DiffusionModelUNet", **UNET_ARGS)), "no CUDA here: MONAI's einsums"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert uses_sdpa(build_network("DiffusionModelUNet", **UNET_ARGS))


def test_sdpa_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    einsum = build_network("DiffusionModelUNet", **UNET_ARGS)
    fused = set_sdpa(copy.deepcopy(einsum))
    assert uses_sdpa(fused) and not uses_sdpa(einsum)
    assert "use_flash_attention" not in fused.architecture.args, "an execution setting, not in the weight record"
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 4, 16)
    out_fused, out_einsum = fused(x, t, c), einsum(x, t, c)
    torch.testing.assert_close(out_fused, out_einsum, rtol=1e-5, atol=1e-5)
    out_fused.square().mean().backward()
    out_einsum.square().mean().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), einsum.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_blocks_sdpa_cannot_serve_are_left_alone():
    keeps_maps = SABlock(16, 2, save_attn=True)
    dropout = SABlock(16, 2, dropout_rate=0.1)
    plain = SABlock(16, 2)
    for block in (keeps_maps, dropout, plain):
        set_sdpa(block)
    assert not keeps_maps.use_flash_attention and not dropout.use_flash_attention
    assert plain.use_flash_attention
