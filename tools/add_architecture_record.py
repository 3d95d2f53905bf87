"""Add the architecture record to a weight file exported before records existed (bundles before 0.3.0).

The record is read from the MONAI config that defined the network, checked by loading the file's weights
into the network it describes (strictly), and written into the file under ``"architectures"``; the
weights themselves are not touched. The file is rewritten atomically.

    add-architecture-record --weights models/autoencoder.pt --key autoencoder \\
        --config_file configs/train_autoencoder.json --network_id autoencoder_def
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser

from common.io.atomic import atomic_path
from common.io.weights import load_weights
from common.networks.architecture import ARCHITECTURES_KEY, NETWORKS, NetworkArchitecture


def architecture_from_config(config_file: str | Sequence[str], network_id: str, **overrides) -> NetworkArchitecture:
    """The architecture that config id ``network_id`` builds (references resolved, nothing instantiated)."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(overrides)
    component = parser.get_parsed_content(network_id, instantiate=False)
    config = dict(component.get_config())
    args = {k: v for k, v in component.resolve_args().items() if not k.startswith("_")}
    target = str(config.get("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    if name == "build_network":
        name = args.pop("network")
    elif name == "build_clip_text_model":
        name = "CLIPTextModel"
    if name not in NETWORKS:
        raise ValueError(f"{network_id} in {config_file} builds {target!r}, which is not one of {sorted(NETWORKS)}.")
    return NetworkArchitecture(name, args)


def add_architecture_record(
    weights: str, key: str, config_file: str | Sequence[str], network_id: str, output: str | None = None
) -> NetworkArchitecture:
    """Record the architecture of entry ``key`` of ``weights`` (written to ``output``, default: in place)."""
    state = load_weights(weights)
    if key not in state:
        raise KeyError(f"{weights} has no entry '{key}'; it holds {sorted(state)}.")
    architecture = architecture_from_config(config_file, network_id)
    architecture.build().load_state_dict(state[key])  # the record must describe these weights exactly
    state.setdefault(ARCHITECTURES_KEY, {})[key] = architecture.to_dict()
    with atomic_path(Path(output or weights)) as tmp:
        torch.save(state, tmp)
    print(f"{output or weights}: recorded '{key}' as {architecture.network} {architecture.args}")
    return architecture


def cli() -> None:
    """Entry point of ``add-architecture-record``."""
    fire.Fire(add_architecture_record, serialize=lambda _: None)


if __name__ == "__main__":
    cli()
