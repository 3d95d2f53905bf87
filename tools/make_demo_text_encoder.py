"""Write the demo text encoder of a bundle: a small CLIP text tower with a fixed random initialisation.

The demo models are trained on phantoms whose captions use a handful of words, so a frozen, randomly
initialised tower still gives each prompt a distinct, stable embedding; it is NOT a pretrained CLIP.
Full-size configurations load a pretrained tower instead (``text_encoder`` config key).

    python tools/make_demo_text_encoder.py --output bundles/brain_t1_ldm/models/text_encoder.pt
"""

from __future__ import annotations

import fire
import torch

from common.io.atomic import atomic_path
from common.networks.text_encoder import build_clip_text_model


def main(output: str, hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = build_clip_text_model(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads)
    with atomic_path(output) as tmp:
        torch.save({"text_encoder": model.state_dict()}, tmp)
    print(f"wrote {output} ({sum(p.numel() for p in model.parameters())} parameters)")


def cli() -> None:
    """Entry point of ``make-demo-text-encoder``."""
    fire.Fire(main)


if __name__ == "__main__":
    cli()
