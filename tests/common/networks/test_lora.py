"""common.networks.lora: LoRA adapters on a diffusion UNet's cross-attention and a CLIP text tower's attention."""

from __future__ import annotations

import io

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from common.io.weights import load_weights, state_fingerprint
from common.networks.lora import (
    LoRASettings,
    add_lora,
    cross_attention_targets,
    has_lora,
    load_lora,
    lora_base_fingerprint,
    lora_state,
    merge_lora,
    save_lora,
    text_attention_targets,
)
from common.networks.pairing import fingerprint
from tests.conftest import CONTEXT_DIM, LATENT, LATENT_CHANNELS, make_text_model, make_unet


def _unet_output(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, *LATENT, generator=g), torch.randn(2, 5, CONTEXT_DIM, generator=g)
    return unet(x, torch.tensor([10, 500]), context=context)


def _text_output(text_model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(seed))
    return text_model(input_ids=ids).last_hidden_state


#: base -> (fresh base network from a seed, its adapted layers, a forward pass on fixed random inputs)
BASES = {
    "unet": (make_unet, cross_attention_targets, _unet_output),
    "text_encoder": (make_text_model, text_attention_targets, _text_output),
}


def _settings(base: str, network: torch.nn.Module, rank: int = 4) -> LoRASettings:
    return LoRASettings(rank=rank, alpha=8, target_modules=BASES[base][1](network), base=base)


def _trained(base: str, steps: int = 3) -> tuple[torch.nn.Module, LoRASettings]:
    """A base network of seed 0 with adapters trained a few steps on a toy loss (output towards zero)."""
    make, _, forward = BASES[base]
    network = make(0)
    settings = _settings(base, network)
    add_lora(network, settings)
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        optimizer.zero_grad()
        forward(network, seed=step).square().mean().backward()
        optimizer.step()
    return network, settings


def test_cross_attention_targets_are_the_attn2_projections():
    targets = cross_attention_targets(make_unet())
    # the tiny UNet has one transformer block at its attention level in the down path, middle and up path (x2)
    assert len(targets) == 4 * 4
    assert all(".attn2." in t for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} == {"to_q", "to_k", "to_v", "out_proj"}


def test_text_attention_targets_are_the_clip_projections():
    targets = text_attention_targets(make_text_model())
    assert sorted(t.rsplit(".", 1)[1] for t in targets) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert all(".self_attn." in t for t in targets)


def test_targets_of_an_adapted_network_are_unchanged():
    unet = make_unet()
    targets = cross_attention_targets(unet)
    add_lora(unet, _settings("unet", unet))
    assert cross_attention_targets(unet) == targets


def test_networks_without_those_layers_are_refused():
    unconditioned = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        num_res_blocks=1,
        attention_levels=(False, True),
        num_head_channels=8,
        norm_num_groups=8,
    )
    with pytest.raises(ValueError, match="no cross-attention layers.*with_conditioning=True"):
        cross_attention_targets(unconditioned)
    with pytest.raises(ValueError, match="no CLIP attention layers"):
        text_attention_targets(make_unet())


def test_settings_round_trip_and_validation():
    settings = LoRASettings(rank=4, alpha=8, target_modules=["a.to_q", "a.to_k"], dropout=0.1, base="text_encoder")
    assert settings.target_modules == ("a.to_q", "a.to_k")
    record = settings.to_dict()
    assert record == {
        "rank": 4,
        "alpha": 8,
        "target_modules": ["a.to_q", "a.to_k"],
        "dropout": 0.1,
        "base": "text_encoder",
    }
    assert LoRASettings.from_dict(record) == settings
    with pytest.raises(ValueError, match="Not LoRA settings"):
        LoRASettings.from_dict({**record, "scale": 2})
    with pytest.raises(ValueError, match="Not LoRA settings"):
        LoRASettings.from_dict({"rank": 4})
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}, {"base": "vae"}):
        with pytest.raises(ValueError, match="LoRA"):
            LoRASettings(**{**record, **bad})


@pytest.mark.parametrize("base", sorted(BASES))
def test_adapted_network_starts_as_the_base_and_trains_only_the_adapters(base):
    make, _, forward = BASES[base]
    reference, network = make(0), make(0)
    base_state = {k: v.clone() for k, v in network.state_dict().items()}
    settings = _settings(base, network)
    assert add_lora(network, settings) is network and has_lora(network)
    with torch.no_grad():
        # B starts at zero: the adapted network computes exactly the base function
        assert torch.equal(forward(network), forward(reference))

    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(settings.target_modules)

    trained, _ = _trained(base)
    with torch.no_grad():
        assert not torch.allclose(forward(trained), forward(reference))
    # the base weights are bit-identical: the fingerprint of the base is unchanged by adapting and training
    assert lora_base_fingerprint(trained) == state_fingerprint(base_state) == lora_base_fingerprint(make(0))
    for name, value in trained.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(value, base_state[name.replace(".base_layer.", ".")]), name


def test_base_fingerprint_is_the_one_the_project_records():
    text = make_text_model()
    assert lora_base_fingerprint(text) == fingerprint("text_encoder", text)
    unet = make_unet()
    assert lora_base_fingerprint(unet) == state_fingerprint(unet.state_dict())  # ControlNet's base_model record


def test_adding_adapters_twice_is_refused():
    unet = make_unet()
    add_lora(unet, _settings("unet", unet))
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        add_lora(unet, _settings("unet", unet))


@pytest.mark.parametrize("base", sorted(BASES))
def test_save_and_load_reproduce_the_adapted_network_exactly(base, tmp_path):
    make, _, forward = BASES[base]
    trained, settings = _trained(base)
    path = save_lora(tmp_path / "lora.pt", trained, settings, provenance={"demo": True})

    record = load_weights(path)  # plain values only: it loads with weights_only=True
    assert set(record) == {"lora", "lora_settings", "base_fingerprint", "provenance"}
    assert record["lora_settings"] == settings.to_dict()
    assert (record["lora_settings"]["rank"], record["lora_settings"]["alpha"]) == (4, 8)
    assert record["lora_settings"]["target_modules"] == BASES[base][1](make(0))
    assert record["base_fingerprint"] == lora_base_fingerprint(make(0))
    assert record["provenance"] == {"demo": True}
    assert all(".lora_A." in k or ".lora_B." in k for k in record["lora"])

    fresh = make(0)
    fresh.load_state_dict(make(0).state_dict())  # a new base network built from the same base weights
    assert load_lora(path, fresh) is fresh
    with torch.no_grad():
        assert torch.equal(forward(fresh), forward(trained))
    assert not any(p.requires_grad for name, p in fresh.named_parameters() if ".lora_" not in name)


def test_adapter_file_holds_only_the_adapters(tmp_path):
    trained, settings = _trained("unet", steps=1)
    path = save_lora(tmp_path / "lora.pt", trained, settings)
    base_file = io.BytesIO()
    torch.save(make_unet().state_dict(), base_file)
    assert path.stat().st_size < base_file.getbuffer().nbytes / 4


def test_another_base_network_is_refused_naming_both_fingerprints(tmp_path):
    trained, settings = _trained("unet", steps=1)
    path = save_lora(tmp_path / "lora.pt", trained, settings)
    other = make_unet(seed=1)
    recorded, given = lora_base_fingerprint(make_unet()), lora_base_fingerprint(other)
    with pytest.raises(ValueError, match=rf"adapts another unet.*{recorded[:12]}.*{given[:12]}"):
        load_lora(path, other)
    assert not has_lora(other)  # refused before anything was added


def test_a_file_that_is_not_an_adapter_is_refused(weights_file):
    with pytest.raises(ValueError, match=r"not a LoRA adapter file: it lacks \['lora'"):
        load_lora(weights_file, make_unet())


def test_saving_other_settings_than_the_adapters_is_refused(tmp_path):
    trained, settings = _trained("unet", steps=1)
    other = LoRASettings.from_dict({**settings.to_dict(), "alpha": 16})
    with pytest.raises(ValueError, match="not those the network's adapters were made with"):
        save_lora(tmp_path / "lora.pt", trained, other)
    with pytest.raises(ValueError, match="carries no LoRA adapter"):
        save_lora(tmp_path / "lora.pt", make_unet(), settings)
    assert not (tmp_path / "lora.pt").exists()


@pytest.mark.parametrize("base", sorted(BASES))
def test_merged_adapters_compute_the_same_function_as_a_plain_network(base):
    make, _, forward = BASES[base]
    trained, _ = _trained(base)
    with torch.no_grad():
        adapted = forward(trained)
        merged = merge_lora(trained)
        torch.testing.assert_close(forward(merged), adapted, rtol=1e-5, atol=1e-6)
    assert not has_lora(merged)
    assert merged.state_dict().keys() == make(0).state_dict().keys()
    assert lora_base_fingerprint(merged) != lora_base_fingerprint(make(0))
    with pytest.raises(ValueError, match="no LoRA adapter to merge"):
        merge_lora(merged)


def test_lora_state_holds_only_adapter_tensors():
    trained, settings = _trained("text_encoder", steps=1)
    state = lora_state(trained)
    assert {k.rsplit(".lora_", 1)[0] for k in state} == set(settings.target_modules)
    assert sum(v.numel() for v in state.values()) < sum(p.numel() for p in trained.parameters()) / 10


def test_many_targets_save_although_peft_shortens_them(tmp_path):
    """peft turns a long target list (20 or more layers, as in the demo decoder) into common suffixes; the adapted
    layers are what count, so the settings passed to add_lora still save and load."""
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        channels=(8, 8, 8),
        attention_levels=(True, True, True),
        num_head_channels=8,
        num_res_blocks=1,
        norm_num_groups=8,
        with_conditioning=True,
        cross_attention_dim=CONTEXT_DIM,
    )
    targets = cross_attention_targets(unet)
    assert len(targets) >= 20
    settings = LoRASettings(rank=2, alpha=2, target_modules=targets)
    add_lora(unet, settings)
    assert set(unet.peft_config["default"].target_modules) != set(targets), "peft shortened the list"
    path = save_lora(tmp_path / "lora.pt", unet, settings)
    assert LoRASettings.from_dict(load_weights(path)["lora_settings"]) == settings
    fewer = LoRASettings(rank=2, alpha=2, target_modules=targets[:4])
    with pytest.raises(ValueError, match="not those the network's adapters were made with"):
        save_lora(tmp_path / "other.pt", unet, fewer)
