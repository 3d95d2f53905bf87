"""Network architectures saved beside their weights, so that a weight file says which network it fits.

A network built with :func:`build_network` remembers its class name and arguments (its
:class:`NetworkArchitecture`). ``WeightsExporter`` writes that record into the exported file under
``"architectures"``, next to the state dict::

    {"autoencoder": <state dict>, "architectures": {"autoencoder": {"network": "AutoencoderKL", "args": {...}}}}

and :func:`load_network` rebuilds the network from the file alone. Inference and evaluation configs therefore
declare no architecture: they cannot pair weights with the wrong definition, and a bundle built on another
one (a ControlNet on a base model) reads the base architecture from the base's files.

Only the classes of :data:`NETWORKS` can be named by a record: a weight file never chooses arbitrary code.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet, PatchDiscriminator

from common.io.weights import load_weights
from common.networks.attention import default_sdpa, set_sdpa
from common.networks.clip_model import build_small_clip
from common.networks.embedding_context import build_embedding_conditioned_unet
from common.networks.feature_extractors import PhantomFeatureNet
from common.networks.prior import DiffusionPrior
from common.networks.text_encoder import build_clip_text_model

#: Record key of the architectures inside an exported weight file.
ARCHITECTURES_KEY = "architectures"

#: Names a record may use, and what builds them.
NETWORKS: dict[str, Callable[..., torch.nn.Module]] = {
    "AutoencoderKL": AutoencoderKL,
    "DiffusionModelUNet": DiffusionModelUNet,
    "ControlNet": ControlNet,
    "PatchDiscriminator": PatchDiscriminator,
    "CLIPTextModel": build_clip_text_model,
    "PhantomFeatureNet": PhantomFeatureNet,
    "DiffusionPrior": DiffusionPrior,
    "CLIPModel": build_small_clip,
    "EmbeddingConditionedUNet": build_embedding_conditioned_unet,
}


def _plain(value: Any) -> Any:
    """Arguments as plain JSON-like values (tuples become lists), so records survive ``weights_only`` loading."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise TypeError(
        f"Architecture arguments must be plain values (numbers, strings, lists), got {type(value).__name__}."
    )


@dataclass(frozen=True)
class NetworkArchitecture:
    """A network class name of :data:`NETWORKS` and the keyword arguments that build it."""

    network: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"Unknown network {self.network!r} in an architecture record; known: {sorted(NETWORKS)}.")
        object.__setattr__(self, "args", _plain(self.args))

    def build(self) -> torch.nn.Module:
        """A freshly initialised network of this architecture, which remembers it.

        Where CUDA is available, MONAI attention blocks run through PyTorch's SDPA
        (:func:`common.networks.attention.default_sdpa`).
        """
        module = set_sdpa(NETWORKS[self.network](**copy.deepcopy(self.args)), default_sdpa())
        module.architecture = self
        return module

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "args": copy.deepcopy(self.args)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> NetworkArchitecture:
        if not isinstance(record, Mapping) or "network" not in record:
            raise ValueError(f"Not an architecture record: {record!r}.")
        return cls(str(record["network"]), dict(record.get("args", {})))


def build_network(network: str, **args: Any) -> torch.nn.Module:
    """Build ``network`` (a name of :data:`NETWORKS`) with ``args``; the module remembers its architecture.

    Use it as a config's ``_target_`` in place of the class itself: ``{"_target_":
    "common.networks.architecture.build_network", "network": "AutoencoderKL", "spatial_dims": 2, ...}``.
    """
    return NetworkArchitecture(network, args).build()


def architecture_of(module: torch.nn.Module) -> NetworkArchitecture | None:
    """The architecture a module was built with (through :func:`build_network` or a record), if known.

    A ``DistributedDataParallel`` wrapper is looked through.
    """
    module = (
        getattr(module, "module", module) if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    )
    return getattr(module, "architecture", None)


def read_architecture(
    weights: Mapping[str, Any], key: str, path: str | Path = "the weight file"
) -> NetworkArchitecture:
    """The architecture recorded for entry ``key`` of loaded weights.

    Raises:
        ValueError: the file has no record for ``key`` (written before records existed, or by another tool).
    """
    records = weights.get(ARCHITECTURES_KEY, {})
    if key not in records:
        raise ValueError(
            f"{path} does not record the architecture of its '{key}' network (weight files exported before this project "
            "recorded architectures do not). Add the record with `add-architecture-record --weights FILE --key "
            f"{key} --config_file CONFIG --network_id ID`, naming the config that defined the network."
        )
    return NetworkArchitecture.from_dict(records[key])


def network_from_weights(weights: Mapping[str, Any], key: str, path: str | Path = "the weight file") -> torch.nn.Module:
    """The network of entry ``key`` of loaded ``weights``, built from its record and loaded (strictly)."""
    if key not in weights:
        raise KeyError(f"{path} has no entry '{key}'; it holds {sorted(weights)}.")
    network = read_architecture(weights, key, path).build()
    network.load_state_dict(weights[key])
    return network


def load_network(path: str | Path, key: str, how_to_get: str = "", sha256: str | None = None) -> torch.nn.Module:
    """Read a weight file (safely, see ``load_weights``) and return its ``key`` network, built from its record."""
    return network_from_weights(load_weights(path, sha256=sha256, how_to_get=how_to_get), key, path)


def architecture_records(objects: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: record}`` for the networks among ``objects`` that know their architecture."""
    records = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module) and (arch := architecture_of(obj)) is not None:
            records[name] = arch.to_dict()
    return records
