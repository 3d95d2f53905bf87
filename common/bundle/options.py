"""A bundle's run options, declared once in ``configs/options.json`` and checked before any work.

MONAI's CLI accepts any ``--key value`` and adds it to the config: a mistyped name (``--promt``) is silently
ignored, and a value of the wrong type (``--guidance_scale nan`` arrives as the text ``"nan"``) fails deep in the
run. So every bundle declares its options in ``configs/options.json``::

    {
        "seed": "standard",
        "conditioning_scale": {"schema": {"type": "number", "minimum": 0}, "help": "ControlNet residual weight"}
    }

``"standard"`` takes the declaration of :data:`STANDARD_OPTIONS` (the knobs every bundle shares); a dict is a
JSON Schema (checked with ``jsonschema``) plus a help text. :func:`check_overrides` checks what the user gave:

- a name that no config being run defines is an error, with "did you mean" and, when another config of the
  bundle defines it, which one (``--num_samples`` belongs to ``evaluate.json``);
- a declared option's value must match its schema and be finite.

Names MONAI's ``run`` itself takes (``config_file``, ``meta_file``, ...) and nested ids (``network_def#channels``
of a defined key) pass unchecked. Every run config calls :func:`check_command_line` first in ``initialize``; under
``python -m monai.bundle run`` it reads the command line, prints the problems as the last lines of the output and
exits with status 2 before anything is loaded. Used from Python (``ConfigWorkflow(**overrides)``), call
:func:`check_overrides` on the overrides instead.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPTIONS_FILE = "options.json"
STANDARD = "standard"
#: Declares a key that is part of the bundle's wiring (a hint text, a data key), not a knob: not checked.
INTERNAL = "internal"


class BundleOptionError(ValueError):
    """Options given to a bundle run are unknown or have values outside what the bundle declares."""


_PATH = {"type": "string", "minLength": 1}
_POSITIVE_INT = {"type": "integer", "minimum": 1}
_OPTIONAL_POSITIVE_INT = {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1}]}
_BOOL = {"type": "boolean"}
_CHANNELS = {"type": "array", "items": _POSITIVE_INT, "minItems": 1}
_FLAGS = {"type": "array", "items": _BOOL, "minItems": 1}
_RATE = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
_WEIGHT = {"type": "number", "minimum": 0}
_STEPS = {"type": "integer", "minimum": 1, "maximum": 1000}
_GUIDANCE = {"type": "number", "minimum": 0, "maximum": 100}
_ETA = {"type": "number", "minimum": 0, "maximum": 1}
_SCHEDULER = {"enum": ["ddim", "ddpm"]}

#: Declarations of the knobs every bundle shares; a bundle's ``options.json`` names them with ``"standard"``.
STANDARD_OPTIONS: dict[str, dict[str, Any]] = {
    "bundle_root": {"schema": {**_PATH, "format": "existing-dir"}, "help": "folder of the bundle (default: .)"},
    "dataset_dir": {"schema": {**_PATH, "format": "existing-dir"}, "help": "folder holding datalist.json"},
    "output_dir": {"schema": _PATH, "help": "folder the outputs are written to (created)"},
    "model_dir": {"schema": _PATH, "help": "folder of the weight files"},
    "run_dir": {"schema": _PATH, "help": "folder of checkpoints, TensorBoard logs and exported weights"},
    "overwrite": {"schema": _BOOL, "help": "replace output files that already exist"},
    "seed": {"schema": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}, "help": "random seed"},
    "device": {
        "schema": {"type": "string", "pattern": "^(cpu|cuda(:[0-9]+)?|mps)$", "format": "device"},
        "help": "torch device, e.g. cpu or cuda:0",
    },
    "amp": {"schema": _BOOL, "help": "mixed precision (CUDA only)"},
    "num_threads": {
        "schema": _OPTIONAL_POSITIVE_INT,
        "help": "CPU threads (None: one per core; 1 is faster on a small machine busy with other work)",
    },
    "precision": {
        "schema": {"enum": ["auto", "fp32", "bf16"]},
        "help": "precision of the network calls while sampling or training (bf16: autocast; auto: bf16 where the "
        "device has native bf16, else fp32)",
    },
    "compile": {
        "schema": _BOOL,
        "help": "torch.compile the trained or sampling networks: minutes of compiling once (seconds with inductor's "
        "cache warm), then faster steps; for long runs (a CPU needs a C++ compiler)",
    },
    "progress": {"schema": _BOOL, "help": "show progress bars"},
    "prompt": {"schema": {"type": "string", "maxLength": 1000}, "help": "text describing the image"},
    "num_samples": {"schema": {"type": "integer", "minimum": 1, "maximum": 100000}, "help": "images to generate"},
    "guidance_scale": {
        "schema": _GUIDANCE,
        "help": "classifier-free guidance weight (0: unconditional, 1: conditional without guidance)",
    },
    "guidance_interval": {
        "schema": {
            "anyOf": [
                {"type": "null"},
                {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 2, "maxItems": 2},
            ]
        },
        "help": "guide only the steps whose noise level sigma is in (low, high], the others conditional "
        "(null: every step)",
    },
    "guidance_distillation": {
        "schema": {"enum": ["auto", True, False]},
        "help": "sample with the guidance-distilled UNet, one call per step: auto (when its file exists and it learned "
        "the guidance asked), True or False",
    },
    "distilled_path": {
        "schema": {"type": "string", "minLength": 1},
        "help": "guidance-distilled diffusion UNet weight file (configs/distill_guidance.json)",
    },
    "num_inference_steps": {
        "schema": _STEPS,
        "help": "sampling steps (at most the training timesteps)",
    },
    "eta": {"schema": _ETA, "help": "DDIM stochasticity (0: deterministic)"},
    "scheduler": {"schema": _SCHEDULER, "help": "sampling scheduler"},
    "batch_size": {"schema": _POSITIVE_INT, "help": "images per sampling batch"},
    "image_size": {
        "schema": {"type": "array", "items": _POSITIVE_INT, "minItems": 2, "maxItems": 3},
        "help": "image size in pixels",
    },
    "spacing": {
        "schema": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 2, "maxItems": 3},
        "help": "pixel spacing in mm",
    },
    "text_encoder": {
        "schema": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1}]},
        "help": "local folder or pinned hub id of a transformers CLIP text model (null: the bundle's own)",
    },
    "text_encoder_revision": {
        "schema": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1}]},
        "help": "hub revision (commit) the text encoder is pinned to",
    },
    "text_hidden_layer": {"schema": {"type": "integer"}, "help": "text encoder layer whose states condition the UNet"},
    "resume": {"schema": _BOOL, "help": "continue from the last checkpoint in run_dir"},
    "demo_weights": {"schema": _BOOL, "help": "mark exported weights as demo weights (trained on phantoms)"},
    "install_weights": {
        "schema": _BOOL,
        "help": "also write the exported weights into the bundle's models/ folder, replacing what is there",
    },
    "num_workers": {"schema": {"type": "integer", "minimum": 0}, "help": "data loader worker processes"},
    "train_limit": {"schema": _OPTIONAL_POSITIVE_INT, "help": "use only the first N training items"},
    "val_limit": {"schema": _OPTIONAL_POSITIVE_INT, "help": "use only the first N validation items"},
    "test_limit": {"schema": _OPTIONAL_POSITIVE_INT, "help": "use only the first N items of the evaluated split"},
    "eval_split": {
        "schema": {"enum": ["training", "validation", "test"]},
        "help": "datalist split evaluated (choose settings on validation; publishing needs test)",
    },
    "val_interval": {"schema": _POSITIVE_INT, "help": "validate every N epochs"},
    "checkpoint_interval": {"schema": _POSITIVE_INT, "help": "save a checkpoint every N epochs"},
    "publish": {"schema": _BOOL, "help": "write the results into the bundle's docs and metadata"},
    "prompt_dropout": {
        "schema": {"type": "number", "minimum": 0, "maximum": 1},
        "help": "fraction of training prompts replaced by the empty prompt (for guidance)",
    },
    "prompt_key": {"schema": {"type": "string", "minLength": 1}, "help": "datalist key holding the training prompt"},
    # latent diffusion training, shared by the latent diffusion bundles
    "latent_channels": {"schema": _POSITIVE_INT, "help": "channels of the autoencoder's latent"},
    "autoencoder_channels": {"schema": _CHANNELS, "help": "autoencoder channels per level"},
    "autoencoder_res_blocks": {"schema": _POSITIVE_INT, "help": "autoencoder residual blocks per level"},
    "autoencoder_attention": {"schema": _FLAGS, "help": "autoencoder attention per level"},
    "discriminator_channels": {"schema": _POSITIVE_INT, "help": "patch discriminator channels"},
    "discriminator_layers": {"schema": _POSITIVE_INT, "help": "patch discriminator layers"},
    "ae_batch_size": {"schema": _POSITIVE_INT, "help": "autoencoder training batch size (per process)"},
    "ae_max_epochs": {"schema": _POSITIVE_INT, "help": "autoencoder training epochs"},
    "ae_learning_rate": {"schema": _RATE, "help": "autoencoder learning rate"},
    "discriminator_learning_rate": {"schema": _RATE, "help": "discriminator learning rate"},
    "kl_weight": {"schema": _WEIGHT, "help": "weight of the KL term"},
    "perceptual_weight": {"schema": _WEIGHT, "help": "weight of the perceptual (LPIPS) term"},
    "perceptual_network": {
        "schema": {"enum": ["radimagenet_resnet50"]},
        "help": "network of the perceptual loss (2D: RadImageNet ResNet-50, weights from perceptual_cache_dir)",
    },
    "perceptual_cache_dir": {
        "schema": {"anyOf": [{"type": "null"}, {**_PATH, "format": "existing-dir"}]},
        "help": "local folder holding the perceptual network's weights",
    },
    "adversarial_weight": {"schema": _WEIGHT, "help": "weight of the adversarial term"},
    "adversarial_start_epoch": {
        "schema": {"type": "integer", "minimum": 0},
        "help": "epoch the adversarial term starts",
    },
    "unet_channels": {"schema": _CHANNELS, "help": "diffusion UNet channels per level"},
    "unet_attention": {"schema": _FLAGS, "help": "diffusion UNet attention per level"},
    "unet_head_channels": {
        "schema": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        "help": "channels per attention head per level (0 where there is no attention)",
    },
    "unet_res_blocks": {"schema": _POSITIVE_INT, "help": "diffusion UNet residual blocks per level"},
    "ldm_batch_size": {"schema": _POSITIVE_INT, "help": "diffusion training batch size (per process)"},
    "ldm_max_epochs": {"schema": _POSITIVE_INT, "help": "diffusion training epochs"},
    "ldm_learning_rate": {"schema": _RATE, "help": "diffusion learning rate"},
    "ema_decay": {
        "schema": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "help": "decay per step of the weights' moving average that is validated and exported (0.999: about 1000 steps)",
    },
    "scale_factor": {
        "schema": {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0}]},
        "help": "latent scale factor (null: 1 / std of the first latents, computed at the start)",
    },
    "cache_latents": {
        "schema": _BOOL,
        "help": "encode the training images once and draw latents from the cached moments (same distribution, faster)",
    },
    "sample_steps": {"schema": _STEPS, "help": "sampling steps of the TensorBoard sample images"},
    # contrastive (CLIP) training
    "clip_path": {
        "schema": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1}]},
        "help": "local folder or pinned hub id of a pretrained transformers CLIP to fine-tune (null: a small new one)",
    },
    "clip_revision": {
        "schema": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1}]},
        "help": "hub revision (commit) the CLIP is pinned to",
    },
    "clip_batch_size": {
        "schema": {"type": "integer", "minimum": 2},
        "help": "contrastive batch size (per process; the other items of a batch are the negatives)",
    },
    "clip_max_epochs": {"schema": _POSITIVE_INT, "help": "CLIP training epochs"},
    "clip_learning_rate": {"schema": _RATE, "help": "CLIP learning rate"},
    "clip_weight_decay": {"schema": _WEIGHT, "help": "CLIP AdamW weight decay"},
    "sample_guidance_scale": {"schema": _GUIDANCE, "help": "guidance of the TensorBoard sample images"},
    "distilled_guidance_scale": {
        "schema": {"type": "number", "exclusiveMinimum": 1, "maximum": 100},
        "help": "the guidance scale distill_guidance.json's student learns",
    },
    # evaluation of generation
    "eval_num_samples": {"schema": {"type": "integer", "minimum": 2}, "help": "samples generated for evaluation"},
    "eval_guidance_scale": {"schema": _GUIDANCE, "help": "guidance of the evaluation samples"},
    "eval_num_inference_steps": {"schema": _STEPS, "help": "sampling steps of the evaluation samples"},
    "eval_eta": {"schema": _ETA, "help": "DDIM eta of the evaluation samples"},
    "eval_scheduler": {"schema": _SCHEDULER, "help": "scheduler of the evaluation samples"},
    "eval_batch_size": {"schema": _POSITIVE_INT, "help": "evaluation batch size"},
}


@dataclass(frozen=True)
class BundleOption:
    """One declared option: its JSON Schema and what it does."""

    name: str
    schema: Mapping[str, Any]
    help: str = ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (``"not allowed"`` when the schema alone says it), or ``None`` when it is."""
        from jsonschema import Draft202012Validator, FormatChecker

        if (bad := _first_non_finite(value)) is not None:
            return f"{bad} is not a finite number"
        validator = Draft202012Validator(self.schema, format_checker=_format_checker(FormatChecker))
        errors = sorted(validator.iter_errors(value), key=lambda e: len(e.path))
        if not errors:
            return None
        if errors[0].validator == "format" and errors[0].cause is not None:
            return str(errors[0].cause)
        if isinstance(value, str) and self.schema.get("type") in ("number", "integer", "boolean"):
            return f"the command line read it as the text {value!r}"
        return "not allowed"

    def describe(self) -> str:
        """What is allowed, in words: ``"an integer >= 1"``."""
        return describe_schema(self.schema)


def describe_schema(schema: Mapping[str, Any]) -> str:
    """A JSON Schema of the subset options use, in words (``{"type": "number", "minimum": 0}`` -> ``a number >= 0``)."""
    if "anyOf" in schema:
        return " or ".join(describe_schema(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return "None"
    if kind == "boolean":
        return "True or False, capitalised (the MONAI command line reads true as text)"
    if kind == "array":
        items = describe_schema(schema.get("items", {}))
        count = schema.get("minItems"), schema.get("maxItems")
        size = f"{count[0]}" if count[0] == count[1] else f"{count[0]} to {count[1]}"
        return f"a list of {size} values, each {items}" if count[0] is not None else f"a list of {items}"
    if kind == "string":
        if schema.get("format") in _FORMAT_WORDS:
            return _FORMAT_WORDS[schema["format"]]
        parts = ["text"]
        if schema.get("pattern"):
            parts.append(f"matching {schema['pattern']}")
        if "maxLength" in schema:
            parts.append(f"of at most {schema['maxLength']} characters")
        return " ".join(parts)
    noun = {"integer": "an integer", "number": "a finite number"}.get(kind, "a value")
    bounds = []
    if "minimum" in schema:
        bounds.append(f">= {schema['minimum']}")
    if "exclusiveMinimum" in schema:
        bounds.append(f"> {schema['exclusiveMinimum']}")
    if "maximum" in schema:
        bounds.append(f"<= {schema['maximum']}")
    return " ".join([noun, " and ".join(bounds)]).strip()


_FORMAT_WORDS = {
    "existing-dir": "an existing folder",
    "existing-file": "an existing file",
    "device": "a device this machine has (cpu, cuda:N, mps)",
}


def _format_checker(checker_class):
    checker = checker_class(formats=())

    @checker.checks("existing-dir", raises=ValueError)
    def _existing_dir(value: object) -> bool:
        if isinstance(value, str) and not Path(value).is_dir():
            raise ValueError(f"{value} is not an existing folder")
        return True

    @checker.checks("existing-file", raises=ValueError)
    def _existing_file(value: object) -> bool:
        if isinstance(value, str) and not Path(value).is_file():
            raise ValueError(f"{value} is not an existing file")
        return True

    @checker.checks("device", raises=ValueError)
    def _device(value: object) -> bool:
        if isinstance(value, str) and value.startswith("cuda"):
            import torch

            count = torch.cuda.device_count()
            index = int(value.split(":")[1]) if ":" in value else 0
            if index >= count:
                raise ValueError(f"this machine has {count} CUDA device(s); use --device cpu")
        return True

    return checker


def _first_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        return next((bad for v in value if (bad := _first_non_finite(v)) is not None), None)
    return None


class BundleOptions:
    """The declared options of one bundle (``configs/options.json``) and the configs they belong to."""

    def __init__(self, options: Mapping[str, BundleOption], configs_dir: str | Path) -> None:
        self.options = dict(options)
        self.configs_dir = Path(configs_dir)

    @classmethod
    def from_configs_dir(cls, configs_dir: str | Path) -> BundleOptions:
        """Read ``configs_dir/options.json``; ``"standard"`` entries come from :data:`STANDARD_OPTIONS`."""
        path = Path(configs_dir) / OPTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: every bundle declares its run options there.")
        raw = json.loads(path.read_text())
        options = {}
        for name, entry in raw.items():
            if name.startswith("_"):
                continue
            if entry == INTERNAL:
                continue
            if entry == STANDARD:
                if name not in STANDARD_OPTIONS:
                    raise ValueError(f"{path}: '{name}' is not a standard option ({', '.join(STANDARD_OPTIONS)}).")
                entry = STANDARD_OPTIONS[name]
            if not isinstance(entry, Mapping) or "schema" not in entry:
                raise ValueError(f'{path}: \'{name}\' must be "standard" or {{"schema": {{...}}, "help": "..."}}.')
            options[name] = BundleOption(name, entry["schema"], entry.get("help", ""))
        return cls(options, configs_dir)

    def defined_keys(self, config_files: Sequence[str | Path]) -> dict[str, Any]:
        """Top-level keys of ``config_files`` (merged in order) with their values."""
        merged: dict[str, Any] = {}
        for file in config_files:
            merged.update(_read_config(file))
        return merged

    def owners(self, name: str) -> list[str]:
        """Config files of this bundle that define ``name`` at the top level."""
        return [
            f"configs/{p.name}"
            for p in sorted(self.configs_dir.glob("*.json"))
            if p.name not in (OPTIONS_FILE, "metadata.json") and name in _read_config(p)
        ]

    def problems(self, config_files: Sequence[str | Path], overrides: Mapping[str, Any]) -> list[str]:
        """One message per option of ``overrides`` that is unknown to ``config_files`` or has a bad value."""
        defined = self.defined_keys(config_files)
        run_names = ", ".join(f"configs/{Path(f).name}" for f in config_files)
        messages = []
        for name, value in overrides.items():
            root = name.split("#")[0]
            if root in RUN_PARAMETERS:
                continue
            if root not in defined:
                messages.append(self._unknown(name, root, defined, run_names))
            elif name in self.options:
                option = self.options[name]
                if (problem := option.problem(value)) is not None:
                    default = defined.get(name)
                    example = f" (default {default!r})" if _is_plain(default) else ""
                    messages.append(
                        f"--{name} {value}: {problem}. Give {option.describe()}{example} ({name}: {option.help})."
                    )
        return messages

    def _unknown(self, name: str, root: str, defined: Mapping[str, Any], run_names: str) -> str:
        message = f"--{name}: no such option in {run_names}."
        if owners := [o for o in self.owners(root) if not run_names.endswith(o) and o not in run_names]:
            message += f" It belongs to {', '.join(owners)}: add that file to --config_file."
        candidates = list(self.options) + [k for k in defined if not k.startswith("_")]
        candidates = [c for c in candidates if c != root]
        if close := difflib.get_close_matches(root, candidates, n=3, cutoff=0.7):
            message += " Did you mean " + " or ".join(f"--{c}" for c in dict.fromkeys(close)) + "?"
        else:
            message += f" The options are declared in {self.configs_dir / OPTIONS_FILE}."
        return message


def _read_config(path: str | Path) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_file(str(path)))


def _is_plain(value: Any) -> bool:
    """A literal a user may set (number, text, bool, None, or a list of them), not an expression or a reference."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, list):
        return all(_is_plain(v) and not isinstance(v, (dict, list)) for v in value)
    return isinstance(value, (int, float, bool)) or value is None


def _run_parameters() -> frozenset[str]:
    from monai.bundle import ConfigWorkflow, scripts

    names = set()
    for function in (scripts.run, scripts.create_workflow, ConfigWorkflow.__init__):
        names.update(
            p.name for p in inspect.signature(function).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD
        )
    return frozenset(names - {"self"})


class _RunParameters:
    """The names MONAI's ``run`` takes itself, read from its signature once (so a new MONAI release is followed)."""

    _names: frozenset[str] | None = None

    def __contains__(self, name: object) -> bool:
        if self._names is None:
            type(self)._names = _run_parameters()
        return name in self._names  # type: ignore[operator]


RUN_PARAMETERS = _RunParameters()


def check_overrides(config_files: str | Sequence[str | Path], overrides: Mapping[str, Any]) -> None:
    """Raise :class:`BundleOptionError` listing every unknown or invalid option among ``overrides``.

    ``config_files`` are the configs being run (merged in order); the declarations are read from the
    ``options.json`` beside the first.
    """
    files = [config_files] if isinstance(config_files, (str, Path)) else list(config_files)
    options = BundleOptions.from_configs_dir(Path(files[0]).parent)
    if problems := options.problems(files, overrides):
        raise BundleOptionError(_format(problems))


def _format(problems: Sequence[str]) -> str:
    count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    return f"{count} with the options given; nothing was run:\n" + "\n".join(f"  {p}" for p in problems)


def parse_command_line(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``(config_files, overrides)`` of a ``monai.bundle run`` command line, values parsed as MONAI's CLI (fire) does.

    ``argv`` is what follows the program: ``["run", "--config_file", "configs/inference.json", "--seed", "3"]``.
    An ``--args_file`` (JSON or YAML) is read; the command line wins over it.
    """
    from fire.parser import DefaultParseValue

    tokens = list(argv)
    if tokens and not tokens[0].startswith("-"):
        tokens = tokens[1:]  # the command, e.g. "run"
    given: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--") or token == "--":
            continue
        name, has_value, text = token[2:].partition("=")
        if not has_value:
            if i < len(tokens) and not tokens[i].startswith("--"):
                text = tokens[i]
                i += 1
            else:
                given[name.replace("-", "_")] = True
                continue
        given[name.replace("-", "_")] = DefaultParseValue(text)
    if "args_file" in given:
        given = {**_read_config(given["args_file"]), **given}
    config_files = given.get("config_file", [])
    config_files = [config_files] if isinstance(config_files, str) else list(config_files)
    overrides = {k: v for k, v in given.items() if k not in RUN_PARAMETERS}
    return [str(f) for f in config_files], overrides


def running_monai_cli(argv: Sequence[str] | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle`` (directly or under torchrun)."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def check_command_line() -> bool:
    """Check the options of the ``monai.bundle run`` command line of this process; the first step of every run config.

    Outside MONAI's CLI (tests, Python callers) it does nothing and returns ``False``: call
    :func:`check_overrides` there. Under the CLI it also makes every later error end the output with its cause
    (:func:`common.bundle.errors.install_error_summary`); on bad options it prints them to stderr and exits with
    status 2, so that they are the last lines the user sees, not buried in a traceback.
    """
    if not running_monai_cli():
        return False
    from common.bundle.errors import install_error_summary

    install_error_summary()
    config_files, overrides = parse_command_line(sys.argv[1:])
    if not config_files:
        return True
    try:
        check_overrides(config_files, overrides)
    except BundleOptionError as error:
        # SystemExit passes through MONAI's expression wrapper, so these are the last lines printed
        print(f"\nerror: {error}", file=sys.stderr)
        sys.exit(2)
    return True


def undeclared_knobs(config_files: Iterable[str | Path], declared: Iterable[str]) -> list[str]:
    """Top-level keys of ``config_files`` with a plain default (number, text, list, bool) not in ``declared``."""
    declared = set(declared)
    found = []
    for file in config_files:
        for key, value in _read_config(file).items():
            if key[:1] not in ("_", "+") and "#" not in key and _is_plain(value) and key not in declared:
                found.append(f"{Path(file).name}: {key}")
    return sorted(set(found))
