"""Import the MONAI Model Zoo's chest X-ray LDM weights (old ``monai-generative`` format) into this project's format.

The zoo bundle ``cxr_image_synthesis_latent_diffusion_model`` ships ``models/autoencoder.pth`` and
``models/diffusion_model.pth``, bare state dicts of the archived ``generative`` networks. This writes
``OUTPUT_DIR/autoencoder.pt`` and ``OUTPUT_DIR/diffusion_model.pt`` as this project's bundles load them: MONAI-core
state dicts with their architecture records, the latent scale factor and noise schedule of the zoo model, provenance
(the sha256 of each source file), and the fingerprints of the autoencoder (and text encoder, when given) that the
diffusion model depends on. The conversion is checked key by key (``common.networks.zoo_import``)::

    import-zoo-weights --zoo_dir cxr_image_synthesis_latent_diffusion_model --output_dir models \\
        [--text_encoder models/text_encoder.pt] [--overwrite]
    import-zoo-weights --autoencoder autoencoder.pth --diffusion_model diffusion_model.pth --output_dir models

``--autoencoder_args`` / ``--unet_args`` (a JSON object, or a JSON file holding one, such as the zoo bundle's
``configs/inference.json``; MONAI-core or ``monai-generative`` argument names) replace the zoo architecture, for other
sizes (tests convert tiny networks this way).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import torch

from common.diffusion.schedules import SchedulerSettings
from common.io.atomic import atomic_path, check_output_dir
from common.io.provenance import PROVENANCE_KEY
from common.io.weights import load_weights, sha256sum
from common.networks.architecture import ARCHITECTURES_KEY, architecture_records, load_network
from common.networks.pairing import DEPENDS_ON_KEY, fingerprint
from common.networks.zoo_import import (
    CXR_AUTOENCODER_ARGS,
    CXR_SCALE_FACTOR,
    CXR_SCHEDULER,
    CXR_UNET_ARGS,
    CXR_ZOO_BUNDLE,
    ConversionError,
    autoencoder_from_old,
    unet_from_old,
)

#: Where the converted files go inside ``--output_dir``.
OUTPUT_NAMES = {"autoencoder": "autoencoder.pt", "diffusion_model": "diffusion_model.pt"}

#: Where a downloaded zoo bundle keeps each file.
ZOO_FILES = {"autoencoder": "models/autoencoder.pth", "diffusion_model": "models/diffusion_model.pth"}

HOW_TO_GET = (
    f"It is part of the MONAI Model Zoo bundle {CXR_ZOO_BUNDLE} (its large_files.yml lists where to download "
    "models/autoencoder.pth and models/diffusion_model.pth)."
)


_JSON_WORDS = {"true": True, "false": False, "null": None}


def _json_words_restored(value: Any) -> Any:
    """``value`` with the strings ``"true"``, ``"false"``, ``"null"`` read as JSON reads them.

    fire parses ``--unet_args '{"with_conditioning": false}'`` itself and keeps JSON's words as strings, and the string
    ``"false"`` is true. No architecture argument takes one of these words as a string.
    """
    if isinstance(value, Mapping):
        return {k: _json_words_restored(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_words_restored(v) for v in value]
    return _JSON_WORDS.get(value, value) if isinstance(value, str) else value


#: Entries of a JSON file that may hold each network's arguments: the fixture's ``architecture.json`` names them
#: ``autoencoder`` / ``unet``, the zoo bundle's ``configs/inference.json`` ``autoencoder_def`` / ``diffusion_def``.
ARGS_ENTRIES = {"autoencoder_args": ("autoencoder", "autoencoder_def"), "unet_args": ("unet", "diffusion_def")}


def read_args(value: Mapping[str, Any] | str | None, default: Mapping[str, Any], option: str) -> dict[str, Any]:
    """Architecture arguments from ``--option``, else ``default``.

    ``value`` is a dict (fire parsed it), JSON text, or a .json file holding the arguments or an entry of
    :data:`ARGS_ENTRIES` with them (so the zoo's own ``configs/inference.json`` can be given).
    """
    if value is None:
        return dict(default)
    if isinstance(value, Mapping):
        return _json_words_restored(value)
    text = Path(value).read_text() if Path(value).suffix == ".json" and Path(value).is_file() else value
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--{option} must be a JSON object or a .json file holding one, got {value!r}: {err}") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"--{option} must be a JSON object (argument name: value), got {type(parsed).__name__}.")
    entry = next((parsed[name] for name in ARGS_ENTRIES[option] if isinstance(parsed.get(name), dict)), None)
    return parsed if entry is None else entry


def source_files(autoencoder: str | None, diffusion_model: str | None, zoo_dir: str | None) -> dict[str, Path]:
    """``{"autoencoder": path, "diffusion_model": path}``: given explicitly, or where a zoo bundle folder keeps them."""
    given = {"autoencoder": autoencoder, "diffusion_model": diffusion_model}
    if zoo_dir is None and None in given.values():
        raise ValueError("Give --autoencoder and --diffusion_model (the zoo's .pth files), or --zoo_dir (the bundle).")
    return {name: Path(path) if path is not None else Path(zoo_dir) / ZOO_FILES[name] for name, path in given.items()}


def output_files(output_dir: str | Path, overwrite: bool) -> dict[str, Path]:
    """The files to write; refuses, before any work, to replace existing ones unless ``overwrite``."""
    output_dir = check_output_dir(output_dir)
    outputs = {name: output_dir / filename for name, filename in OUTPUT_NAMES.items()}
    if not overwrite and (existing := [str(path) for path in outputs.values() if path.exists()]):
        raise FileExistsError(f"Would replace {', '.join(existing)}: pass --overwrite to replace them.")
    return outputs


def load_old(path: Path) -> dict[str, torch.Tensor]:
    """An old state dict read safely (``weights_only=True``); a clear error for a missing or unreadable file."""
    return load_weights(path, how_to_get=HOW_TO_GET)


def check_latent_channels(autoencoder: torch.nn.Module, unet: torch.nn.Module) -> None:
    """The UNet must denoise latents of the autoencoder: as many input and output channels as latent channels."""
    latent = autoencoder.architecture.args["latent_channels"]
    unet_args = unet.architecture.args
    if not unet_args["in_channels"] == unet_args["out_channels"] == latent:
        raise ConversionError(
            f"The diffusion model works on {unet_args['in_channels']}-channel inputs, the autoencoder makes "
            f"{latent}-channel latents: they are not one latent diffusion model (check --autoencoder_args/--unet_args)."
        )


def text_encoder_fingerprint(path: str | Path, unet: torch.nn.Module) -> str:
    """Fingerprint of a text encoder of this project's format, after checking that its width fits the UNet."""
    text_encoder = load_network(path, "text_encoder")
    width = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    expected = unet.architecture.args.get("cross_attention_dim")
    if width is not None and expected is not None and width != expected:
        raise ConversionError(
            f"{path} makes {width}-wide embeddings, the diffusion model attends to {expected}-wide ones: it is not the "
            "text encoder this model was trained with (the zoo CXR model used the SD-2.1-base CLIP text tower)."
        )
    return fingerprint("text_encoder", text_encoder)


def provenance(sources: Mapping[str, Path]) -> dict[str, Any]:
    """Where the imported weights come from, with the sha256 of each source file."""
    return {
        "demo": False,
        "source": f"MONAI Model Zoo {CXR_ZOO_BUNDLE}",
        "source_sha256": {name: sha256sum(path) for name, path in sources.items()},
    }


def autoencoder_file(autoencoder: torch.nn.Module, origin: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``autoencoder.pt``."""
    return {
        "autoencoder": autoencoder.state_dict(),
        ARCHITECTURES_KEY: architecture_records({"autoencoder": autoencoder}),
        PROVENANCE_KEY: dict(origin),
    }


def diffusion_model_file(
    unet: torch.nn.Module, origin: Mapping[str, Any], depends_on: Mapping[str, str]
) -> dict[str, Any]:
    """The content of ``diffusion_model.pt``: weights, latent scale factor, schedule, records."""
    return {
        "unet": unet.state_dict(),
        "latent": {"scale_factor": CXR_SCALE_FACTOR},
        "scheduler": SchedulerSettings(**CXR_SCHEDULER).state_dict(),
        ARCHITECTURES_KEY: architecture_records({"unet": unet}),
        PROVENANCE_KEY: dict(origin),
        DEPENDS_ON_KEY: dict(depends_on),
    }


def import_zoo_weights(
    output_dir: str,
    autoencoder: str | None = None,
    diffusion_model: str | None = None,
    zoo_dir: str | None = None,
    text_encoder: str | None = None,
    overwrite: bool = False,
    autoencoder_args: Mapping[str, Any] | str | None = None,
    unet_args: Mapping[str, Any] | str | None = None,
) -> dict[str, Path]:
    """Convert the zoo CXR LDM weights into ``output_dir/autoencoder.pt`` and ``output_dir/diffusion_model.pt``.

    Args:
        output_dir: folder of the converted files (made if missing).
        autoencoder: the zoo's ``autoencoder.pth``; default ``ZOO_DIR/models/autoencoder.pth``.
        diffusion_model: the zoo's ``diffusion_model.pth``; default ``ZOO_DIR/models/diffusion_model.pth``.
        zoo_dir: a downloaded zoo bundle folder.
        text_encoder: this project's ``text_encoder.pt`` holding the text tower the model was trained with; its
            fingerprint is recorded so that loading refuses another one.
        overwrite: replace existing converted files.
        autoencoder_args, unet_args: other architecture arguments than the zoo model's (JSON object or .json file).

    Returns:
        ``{"autoencoder": path, "diffusion_model": path}`` of the written files.
    """
    sources = source_files(autoencoder, diffusion_model, zoo_dir)
    outputs = output_files(output_dir, overwrite)
    autoencoder_net = autoencoder_from_old(
        load_old(sources["autoencoder"]),
        read_args(autoencoder_args, CXR_AUTOENCODER_ARGS, "autoencoder_args"),
        source=str(sources["autoencoder"]),
    )
    unet = unet_from_old(
        load_old(sources["diffusion_model"]),
        read_args(unet_args, CXR_UNET_ARGS, "unet_args"),
        source=str(sources["diffusion_model"]),
    )
    check_latent_channels(autoencoder_net, unet)
    depends_on = {"autoencoder": fingerprint("autoencoder", autoencoder_net)}
    if text_encoder is not None:
        depends_on["text_encoder"] = text_encoder_fingerprint(text_encoder, unet)
    origin = provenance(sources)
    # Both files are renamed into place only once both are fully written.
    with atomic_path(outputs["autoencoder"]) as ae_tmp, atomic_path(outputs["diffusion_model"]) as dm_tmp:
        torch.save(autoencoder_file(autoencoder_net, origin), ae_tmp)
        torch.save(diffusion_model_file(unet, origin, depends_on), dm_tmp)
    for name, path in outputs.items():
        print(f"{path}: {name} converted from {sources[name]}")
    return outputs


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``import-zoo-weights`` (``argv``: the arguments, default the command line's)."""
    fire.Fire(import_zoo_weights, command=None if argv is None else list(argv), serialize=lambda _: None)


if __name__ == "__main__":
    cli()
