"""Which weights a model was trained with, recorded at export and checked at load.

A diffusion model only makes sense with the latent space and the text encoder it was trained on: another
autoencoder decodes its latents into noise, another text tower gives it embeddings it never saw, and both
fail silently. So an exported diffusion model records, under ``"depends_on"``, a fingerprint of each
network it depends on, and loading refuses a set that does not match.

What is fingerprinted is what the model depends on, not the whole file: for an autoencoder, the encoder
side that defines the latent space (``encoder``, ``quant_conv_mu``, ``quant_conv_log_sigma``), so that
fine-tuning the decoder alone (``finetune_decoder.json``) keeps the pairing valid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.io.weights import state_fingerprint

logger = logging.getLogger(__name__)

#: Record key of the fingerprints inside an exported weight file.
DEPENDS_ON_KEY = "depends_on"

#: State-dict prefixes of each kind of dependency that the dependent model relies on; ``None`` means all of it.
DEPENDENCY_PARTS: dict[str, tuple[str, ...] | None] = {
    "autoencoder": ("encoder.", "quant_conv_mu.", "quant_conv_log_sigma."),
    "text_encoder": None,
    "clip": None,
}


def fingerprint(name: str, network: torch.nn.Module) -> str:
    """The fingerprint of the part of ``network`` that a model depending on it as ``name`` relies on."""
    if name not in DEPENDENCY_PARTS:
        raise ValueError(f"Unknown dependency {name!r}; known: {sorted(DEPENDENCY_PARTS)}.")
    network = getattr(network, "module", network)  # a DistributedDataParallel wrapper is looked through
    return state_fingerprint(network.state_dict(), DEPENDENCY_PARTS[name])


class DependencyRecord:
    """Exported beside a model's weights (``"depends_on"`` entry): fingerprints of the networks it was trained with.

    The fingerprints are taken when the weights are exported (``state_dict``), so they describe the networks as
    they were at the end of training.
    """

    def __init__(self, **networks: torch.nn.Module) -> None:
        self.networks = networks

    def state_dict(self) -> dict[str, str]:
        return {name: fingerprint(name, network) for name, network in self.networks.items()}


def check_dependencies(
    weights: Mapping[str, Any], path: str | Path, how_to_fix: str = "", **networks: torch.nn.Module
) -> Mapping[str, Any]:
    """Return ``weights`` if the networks given match the fingerprints it records; raise ``ValueError`` if not.

    Files exported before fingerprints were recorded are accepted with a warning: they cannot be checked.
    ``how_to_fix`` ends the error (e.g. which bundle version or folder holds the matching weights).
    """
    recorded = weights.get(DEPENDS_ON_KEY)
    if recorded is None:
        logger.warning("%s does not record which networks it was trained with; the pairing cannot be checked.", path)
        return weights
    wrong = [
        name for name, network in networks.items() if name in recorded and recorded[name] != fingerprint(name, network)
    ]
    if wrong:
        parts = ", ".join(
            f"{name} (recorded {recorded[name][:12]}, given {fingerprint(name, networks[name])[:12]})" for name in wrong
        )
        raise ValueError(
            f"{path} was trained with another {' and '.join(wrong)}: {parts}. A diffusion model decodes into noise with "
            f"an autoencoder or text encoder it was not trained with. Use the weights it was trained with. {how_to_fix}"
        )
    return weights


def unpaired_weights(models_dir: str | Path) -> list[str]:
    """Why weight files of ``models_dir`` do not belong together: one per recorded dependency found there that differs.

    A file recording ``depends_on: {"autoencoder": fp}`` is compared with ``models_dir/autoencoder.pt`` (entry
    ``"autoencoder"``, built from its architecture record). Dependencies that live elsewhere (another bundle's
    folder) are not looked for here; loading checks them. A guidance-distilled student
    (:mod:`common.diffusion.distillation`) is compared with its teacher ``models_dir/diffusion_model.pt``.
    """
    from common.diffusion.distillation import DISTILLATION_KEY, TEACHER_FILE
    from common.io.weights import load_weights
    from common.networks.architecture import network_from_weights

    problems = []
    folder = Path(models_dir)
    for path in sorted(folder.glob("*.pt")):
        weights = load_weights(path)
        distilled = weights.get(DISTILLATION_KEY)
        teacher = folder / TEACHER_FILE
        if distilled is not None and teacher.is_file():
            if state_fingerprint(load_weights(teacher)["unet"]) != distilled["teacher"]:
                problems.append(
                    f"{path.name} was distilled from another diffusion model than {teacher.name}: distil it again "
                    "from this one (configs/distill_guidance.json), or leave it out"
                )
        recorded = weights.get(DEPENDS_ON_KEY) or {}
        for name, expected in recorded.items():
            dependency = folder / f"{name}.pt"
            if not dependency.is_file() or name not in DEPENDENCY_PARTS:
                continue
            actual = fingerprint(name, network_from_weights(load_weights(dependency), name, dependency))
            if actual != expected:
                problems.append(
                    f"{path.name} was trained with another {name} than {dependency.name} (recorded {expected[:12]}, "
                    f"found {actual[:12]}): ship the {name} it was trained with, or retrain it"
                )
    return problems
