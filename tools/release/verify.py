"""Verify bundles the way the MONAI Model Zoo CI should, for every bundle folder found (or those of ``--bundles``).

Checks, each failure naming the bundle, the file or network, and the reason:

* ``metadata``: ``configs/metadata.json`` against the zoo schema rules (``tools.release.metadata``: required keys,
  tensor fields of ``network_data_format``, ``version`` in ``changelog``, ...);
* ``properties``: MONAI's ``ConfigWorkflow.check_properties()`` of ``configs/inference.json`` (infer) and every
  ``configs/train_*.json`` (train), instantiated for real on a small data set the declaration makes;
* ``networks``: for every network declared in ``configs/verify.json``: MONAI's ``verify_net_in_out`` (where its
  single float input / single tensor output model applies), the full structure, shapes and dtypes of the
  outputs for the declared example inputs (extra forward arguments included) with the bundle's weights when
  present, TorchScript export with ``monai.bundle.ckpt_export`` (scripted, or traced with the example inputs),
  reload, and the same outputs as the eager network;
* ``large_files``: every file of ``large_files.yml`` present locally matches its hash.

The declaration ``configs/verify.json`` of each bundle says which networks to check and how to call them;
its format is in the README ("Verification"). Usage (from the repository root)::

    python tools/verify_bundles.py [--bundles brain_t1_ldm,other] [--checks metadata,networks] [--networks network_def]

Exit status 1 when any check fails.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.data import save_net_with_metadata

from common.io.atomic import atomic_path
from common.io.weights import load_weights
from tools.release.large_files import read_large_files
from tools.release.metadata import validate_metadata
from tools.release.package import discover_bundles, parse_names

REPO_ROOT = Path(__file__).resolve().parents[2]

DECLARATION = "configs/verify.json"
CHECKS = ("metadata", "large_files", "properties", "networks")
TORCHSCRIPT_MODES = ("script", "trace")
DOCS = "see 'Verification' in the repository README"


@dataclass(frozen=True)
class Problem:
    """One failed check: ``<bundle>: <subject>: <reason>``."""

    bundle: str
    subject: str
    reason: str

    def __str__(self) -> str:
        return f"{self.bundle}: {self.subject}: {self.reason}"


class DeclarationError(ValueError):
    """``configs/verify.json`` is malformed; the message says which entry and why."""


def _error_text(err: BaseException, limit: int = 600) -> str:
    """The innermost cause of ``err`` as one line (config errors wrap the real one several times)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Example inputs and expected outputs --------------------------------------------------------------------


def _dtype(name: Any, where: str) -> torch.dtype:
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise DeclarationError(f"{where}: unknown dtype {name!r} (use e.g. float32, int64)")
    return value


def _is_tensor_spec(spec: Any) -> bool:
    return isinstance(spec, Mapping) and ("shape" in spec or "value" in spec)


def _shape(spec: Mapping, where: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DeclarationError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def make_example(spec: Any, generator: torch.Generator, where: str) -> Any:
    """One forward argument from its declaration (see README): a number, a tensor spec, or a list of them."""
    if isinstance(spec, bool):
        raise DeclarationError(f"{where}: booleans are not forward tensors; leave the argument to its default")
    if isinstance(spec, int | float):
        return torch.tensor(float(spec))  # a scalar argument, as a 0-d tensor (what tracing accepts)
    if isinstance(spec, list):
        return tuple(make_example(s, generator, f"{where}[{i}]") for i, s in enumerate(spec))
    if not _is_tensor_spec(spec):
        raise DeclarationError(f"{where}: expected a number, a list, or an object with 'shape' (or 'value')")
    dtype = _dtype(spec.get("dtype", "float32"), where)
    if "value" in spec:
        return torch.tensor(spec["value"], dtype=dtype)
    shape = _shape(spec, where)
    if dtype.is_floating_point:
        return torch.rand(shape, generator=generator).to(dtype)
    if "high" not in spec:
        raise DeclarationError(f"{where}: an integer tensor needs 'high' (values are drawn from [low, high))")
    return torch.randint(int(spec.get("low", 0)), int(spec["high"]), shape, generator=generator, dtype=dtype)


def compare_output(output: Any, spec: Any, where: str = "output") -> list[str]:
    """Differences between a network's output and its declared structure (tensor / list / named outputs)."""
    if _is_tensor_spec(spec):
        if not isinstance(output, torch.Tensor):
            return [f"{where}: expected a tensor, got {type(output).__name__}"]
        found = []
        if list(output.shape) != _shape(spec, where):
            found.append(f"{where}: shape {list(output.shape)}, declared {spec['shape']}")
        if output.dtype != _dtype(spec.get("dtype", "float32"), where):
            found.append(f"{where}: dtype {output.dtype}, declared {spec.get('dtype', 'float32')}")
        return found
    if isinstance(spec, list):
        if not isinstance(output, list | tuple):
            return [f"{where}: expected a sequence of {len(spec)}, got {type(output).__name__}"]
        if len(output) != len(spec):
            return [f"{where}: {len(output)} items, declared {len(spec)}"]
        return [
            d for i, (o, s) in enumerate(zip(output, spec, strict=True)) for d in compare_output(o, s, f"{where}[{i}]")
        ]
    if isinstance(spec, Mapping):
        if not isinstance(output, Mapping):
            return [f"{where}: expected named outputs {sorted(spec)}, got {type(output).__name__}"]
        if set(output) != set(spec):
            return [f"{where}: outputs {sorted(output)}, declared {sorted(spec)}"]
        return [d for k in spec for d in compare_output(output[k], spec[k], f"{where}.{k}")]
    raise DeclarationError(f"{where}: expected an object with 'shape', a list, or named outputs, got {spec!r}")


def to_device(value: Any, device: str | torch.device) -> Any:
    """Move the tensors of an example argument (a tensor or a tuple of them) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


def flatten(output: Any, where: str = "output") -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor of a nested output, in a stable order."""
    if isinstance(output, torch.Tensor):
        return [(where, output)]
    if isinstance(output, Mapping):
        return [item for k in sorted(output) for item in flatten(output[k], f"{where}.{k}")]
    if isinstance(output, list | tuple):
        return [item for i, o in enumerate(output) for item in flatten(o, f"{where}[{i}]")]
    return []


# The declaration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkDeclaration:
    """How to check one network of a bundle (an entry of ``networks`` in ``configs/verify.json``)."""

    net_id: str
    configs: tuple[str, ...]
    inputs: Mapping[str, Any]
    outputs: Any
    torchscript: str = "script"
    weights: str | None = None
    key: str | None = None
    rtol: float = 1e-4
    atol: float = 1e-5

    @classmethod
    def parse(cls, net_id: str, raw: Any) -> NetworkDeclaration:
        where = f"networks.{net_id}"
        if not isinstance(raw, Mapping):
            raise DeclarationError(f"{where}: must be an object")
        known = {"config", "inputs", "outputs", "torchscript", "weights", "key", "rtol", "atol"}
        if unknown := sorted(set(raw) - known):
            raise DeclarationError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
        inputs = raw.get("inputs")
        if not isinstance(inputs, Mapping) or not inputs:
            raise DeclarationError(
                f'{where}.inputs: give the forward arguments by name, e.g. {{"x": {{"shape": [1, 1, 64, 64]}}}}'
            )
        if "outputs" not in raw:
            raise DeclarationError(f"{where}.outputs: missing; declare the output shape(s)")
        mode = raw.get("torchscript", "script")
        if mode not in TORCHSCRIPT_MODES:
            raise DeclarationError(f"{where}.torchscript: {mode!r} is not one of {TORCHSCRIPT_MODES}")
        config = raw.get("config", "configs/inference.json")
        configs = (config,) if isinstance(config, str) else tuple(config)
        return cls(
            net_id=net_id,
            configs=configs,
            inputs=dict(inputs),
            outputs=raw["outputs"],
            torchscript=mode,
            weights=raw.get("weights"),
            key=raw.get("key"),
            rtol=float(raw.get("rtol", 1e-4)),
            atol=float(raw.get("atol", 1e-5)),
        )

    def examples(self, seed: int = 0) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        return {
            name: make_example(spec, generator, f"networks.{self.net_id}.inputs.{name}")
            for name, spec in self.inputs.items()
        }


@dataclass(frozen=True)
class PropertiesDeclaration:
    """What ``check_properties`` needs: which configs, a small data set, and overrides."""

    configs: Mapping[str, str]  # "file[,overlay...]" -> "infer" or "train"
    dataset: Any = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    imports: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: Any, bundle: Path, imports: Sequence[str]) -> PropertiesDeclaration:
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise DeclarationError("properties: must be an object")
        if unknown := sorted(set(raw) - {"configs", "dataset", "overrides"}):
            raise DeclarationError(f"properties: unknown keys {unknown} (known: configs, dataset, overrides)")
        configs = raw.get("configs")
        if configs is None:
            configs = {"configs/inference.json": "infer"} if (bundle / "configs/inference.json").is_file() else {}
            configs.update({f"configs/{p.name}": "train" for p in sorted((bundle / "configs").glob("train_*.json"))})
        elif isinstance(configs, list):  # layered configs: [{"config": [base, overlay, ...], "type": "train"}, ...]
            layered = {}
            for entry in configs:
                if not isinstance(entry, Mapping) or set(entry) != {"config", "type"}:
                    raise DeclarationError(
                        f'properties.configs: entries are {{"config": ..., "type": ...}}, got {entry!r}'
                    )
                files = entry["config"] if isinstance(entry["config"], list) else [entry["config"]]
                layered[",".join(files)] = entry["type"]
            configs = layered
        return cls(dict(configs), raw.get("dataset"), dict(raw.get("overrides", {})), tuple(imports))


@dataclass(frozen=True)
class Declaration:
    """A bundle's ``configs/verify.json``."""

    networks: tuple[NetworkDeclaration, ...]
    properties: PropertiesDeclaration

    @classmethod
    def load(cls, bundle: Path) -> Declaration:
        path = bundle / DECLARATION
        if not path.is_file():
            raise DeclarationError(
                f"{DECLARATION} is missing: declare the networks to check (config ids, example inputs, outputs); {DOCS}"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DeclarationError(f"{DECLARATION} is not valid JSON: {err}") from err
        if not isinstance(raw, Mapping) or not isinstance(raw.get("networks"), Mapping) or not raw["networks"]:
            raise DeclarationError(f"{DECLARATION}: needs a non-empty 'networks' object; {DOCS}")
        if unknown := sorted(set(raw) - {"networks", "properties", "imports"}):
            raise DeclarationError(f"{DECLARATION}: unknown keys {unknown} (known: networks, properties, imports)")
        networks = tuple(NetworkDeclaration.parse(k, v) for k, v in raw["networks"].items())
        return cls(networks, PropertiesDeclaration.parse(raw.get("properties"), bundle, raw.get("imports", [])))


# Checks ---------------------------------------------------------------------------------------------------


def _substitute(value: Any, names: Mapping[str, str]) -> Any:
    """Replace ``{data}`` / ``{tmp}`` placeholders in every string of a declaration value."""
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace("{" + key + "}", replacement)
        return value
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    if isinstance(value, Mapping):
        return {k: _substitute(v, names) for k, v in value.items()}
    return value


class DatasetCache:
    """Small data sets made from declarations, once per identical declaration in a verification session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path] = {}

    def get(self, spec: Any, imports: Sequence[str]) -> Path:
        key = json.dumps([spec, list(imports)], sort_keys=True)
        if key not in self._made:
            folder = self.root / f"data{len(self._made)}"
            parser = ConfigParser({"imports": list(imports), "dataset": _substitute(spec, {"data": str(folder)})})
            parser.get_parsed_content("dataset")
            self._made[key] = folder
        return self._made[key]


class PropertiesCheck:
    """MONAI's ``check_properties()`` of each declared config, its properties instantiated for real."""

    def __init__(self, bundle: Path, declaration: PropertiesDeclaration, datasets: DatasetCache, tmp: Path) -> None:
        self.bundle = bundle
        self.declaration = declaration
        self.datasets = datasets
        self.tmp = tmp

    def _overrides(self) -> dict[str, Any]:
        names = {"tmp": str(self.tmp)}
        if self.declaration.dataset is not None:
            names["data"] = str(self.datasets.get(self.declaration.dataset, self.declaration.imports))
        return _substitute(dict(self.declaration.overrides), names)

    def run(self) -> list[Problem]:
        problems = []
        if not self.declaration.configs:
            return [Problem(self.bundle.name, "configs", "no configs/inference.json nor configs/train_*.json to check")]
        try:
            overrides = self._overrides()
        except Exception as err:  # noqa: BLE001 - any failure of the data recipe is reported, not raised
            return [Problem(self.bundle.name, f"{DECLARATION} properties.dataset", _error_text(err))]
        for config, workflow_type in self.declaration.configs.items():
            try:
                workflow = ConfigWorkflow(
                    config_file=[str(self.bundle / c) for c in config.split(",")],
                    meta_file=str(self.bundle / "configs" / "metadata.json"),
                    workflow_type=workflow_type,
                    logging_file=False,
                    bundle_root=str(self.bundle),
                    **overrides,
                )
                workflow.initialize()
                missing = workflow.check_properties()
            except Exception as err:  # noqa: BLE001
                problems.append(
                    Problem(self.bundle.name, config, f"cannot instantiate its properties: {_error_text(err)}")
                )
                continue
            if missing:
                problems.append(
                    Problem(self.bundle.name, config, f"missing or wrong {workflow_type} properties: {missing}")
                )
        return problems


class NetworkCheck:
    """In/out shapes (MONAI ``verify_net_in_out`` and the declared output structure) and TorchScript of one network."""

    def __init__(
        self, bundle: Path, declaration: NetworkDeclaration, device: str = "cpu", export_dir: Path | None = None
    ) -> None:
        self.bundle = bundle
        self.decl = declaration
        self.device = device
        self.export_dir = export_dir
        self.subject = f"network {declaration.net_id}"
        self.notes: list[str] = []

    @property
    def config_files(self) -> list[str]:
        return [str(self.bundle / c) for c in self.decl.configs]

    @property
    def meta_file(self) -> str:
        return str(self.bundle / "configs" / "metadata.json")

    def build(self) -> torch.nn.Module:
        """The network from its config id, with the declared weights when they exist locally."""
        net = self._parser().get_parsed_content(self.decl.net_id)
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"config id '{self.decl.net_id}' is a {type(net).__name__}, not a torch.nn.Module")
        if self.decl.weights:
            path = (self.bundle / self.decl.weights).resolve()
            if path.is_file():
                state = load_weights(path)
                if self.decl.key is not None:
                    if self.decl.key not in state:
                        raise KeyError(f"{self.decl.weights} has no entry '{self.decl.key}' (it holds {sorted(state)})")
                    state = state[self.decl.key]
                try:
                    net.load_state_dict(state)
                except RuntimeError as err:
                    raise RuntimeError(f"weights {self.decl.weights} do not fit the config's network: {err}") from None
                return net.to(self.device).eval()
            self.notes.append(f"weights {self.decl.weights} not found locally: checked with random initialisation")
        return self._randomise_zero_layers(net).to(self.device).eval()

    @staticmethod
    def _randomise_zero_layers(net: torch.nn.Module) -> torch.nn.Module:
        """Give all-zero parameters (MONAI zero-initialises UNet / ControlNet output convolutions) random values.

        Without it a randomly initialised network outputs zeros whatever its inputs, and comparing the
        TorchScript copy with the eager network would prove nothing.
        """
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in net.parameters():
                if param.numel() and not param.any():
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        return net

    def _monai_in_out(self, examples: dict[str, Any]) -> None:
        """MONAI's ``verify_net_in_out`` where it applies: a float (N, C, *spatial) first input, one tensor output."""
        (_, x), *rest = examples.items()
        out = self.decl.outputs
        if not (_is_tensor_spec(out) and isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 3):
            self.notes.append(
                "in/out checked against the declaration only (verify_net_in_out needs one float image in, one tensor out)"
            )
            return
        verify_net_in_out(
            net_id=self.decl.net_id,
            meta_file=self.meta_file,
            config_file=self.config_files,
            device=self.device,
            extra_forward_args={k: to_device(v, self.device) for k, v in rest},
            **{
                "bundle_root": str(self.bundle),
                "_meta_#network_data_format#inputs#image": {
                    "num_channels": int(x.shape[1]),
                    "spatial_shape": list(x.shape[2:]),
                    "dtype": str(x.dtype).removeprefix("torch."),
                },
                "_meta_#network_data_format#outputs#pred": {
                    "num_channels": int(out["shape"][1]),
                    "dtype": out.get("dtype", "float32"),
                },
            },
        )

    def _forward(self, net: Callable, examples: dict[str, Any]) -> Any:
        torch.manual_seed(0)  # networks that sample (AutoencoderKL) draw the same noise in both runs
        with torch.no_grad():
            return net(**{k: to_device(v, self.device) for k, v in examples.items()})

    def _parser(self) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(self.config_files)
        parser.read_meta(self.meta_file)
        parser["bundle_root"] = str(self.bundle)
        return parser

    def _uses_ckpt_export(self, examples: dict[str, Any]) -> bool:
        """``ckpt_export`` scripts, or traces with ONE random float input: anything else is traced here."""
        if self.decl.torchscript == "script":
            return True
        (x, *rest) = examples.values()
        return not rest and isinstance(x, torch.Tensor) and x.is_floating_point()

    def _trace_with_keywords(self, net: torch.nn.Module, examples: dict[str, Any], path: Path) -> None:
        """What ``ckpt_export`` does, for forwards it cannot trace (several inputs, integer inputs).

        Traces with every declared argument passed by name and saves with MONAI's ``save_net_with_metadata``
        (bundle metadata and configs as extra files, as ``ckpt_export`` stores them).
        """
        traced = torch.jit.trace(net, example_kwarg_inputs=examples, strict=False, check_trace=False)
        configs = {
            f"{Path(c).stem}.json": json.dumps(ConfigParser.load_config_file(c)).encode() for c in self.config_files
        }
        meta = self._parser().get().get("_meta_")
        save_net_with_metadata(traced, str(path), include_config_vals=False, meta_values=meta, more_extra_files=configs)

    def _torchscript(self, net: torch.nn.Module, examples: dict[str, Any], folder: Path) -> torch.jit.ScriptModule:
        """Export the network with these weights to TorchScript and load the file back."""
        path = folder / "network.ts"
        if not self._uses_ckpt_export(examples):
            self.notes.append(
                "traced with keyword inputs + save_net_with_metadata (ckpt_export traces one float input only)"
            )
            self._trace_with_keywords(net, {k: to_device(v, self.device) for k, v in examples.items()}, path)
            return torch.jit.load(str(path), map_location=self.device)
        torch.save(net.state_dict(), folder / "weights.pt")
        trace = self.decl.torchscript == "trace"
        ckpt_export(
            net_id=self.decl.net_id,
            filepath=str(path),
            ckpt_file=str(folder / "weights.pt"),
            meta_file=self.meta_file,
            config_file=self.config_files,
            key_in_ckpt="",
            use_trace=trace,
            input_shape=list(next(iter(examples.values())).shape) if trace else None,
            converter_kwargs={"strict": False, "check_trace": False} if trace else {},
            bundle_root=str(self.bundle),
        )
        return torch.jit.load(str(path), map_location=self.device)

    def _compare(self, eager: Any, scripted: Any) -> list[str]:
        a, b = flatten(eager), flatten(scripted)
        if [n for n, _ in a] != [n for n, _ in b]:
            return [f"TorchScript outputs {[n for n, _ in b]} differ in structure from eager {[n for n, _ in a]}"]
        found = []
        for (name, x), (_, y) in zip(a, b, strict=True):
            try:
                torch.testing.assert_close(y, x, rtol=self.decl.rtol, atol=self.decl.atol)
            except AssertionError as err:
                found.append(f"TorchScript {name} differs from eager: {' '.join(str(err).split())[:300]}")
        return found

    def _problem(self, step: str, err: BaseException) -> Problem:
        return Problem(self.bundle.name, self.subject, f"{step} failed: {_error_text(err)}")

    def run(self) -> list[Problem]:
        with warnings.catch_warnings():  # tracing warns about every Python branch on a shape
            for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            return self._run()

    def _run(self) -> list[Problem]:
        name = self.bundle.name
        try:
            examples = [self.decl.examples(seed) for seed in (0, 1)]  # a trace must not bake in the first values
        except DeclarationError as err:
            return [Problem(name, DECLARATION, str(err))]
        try:
            self._monai_in_out(examples[0])
        except Exception as err:  # noqa: BLE001 - every failure is reported with the network's name
            return [self._problem("monai verify_net_in_out", err)]
        try:
            net = self.build()
            eager = [self._forward(net, example) for example in examples]
        except Exception as err:  # noqa: BLE001
            return [self._problem("building and running the network", err)]
        try:
            differences = compare_output(eager[0], self.decl.outputs)
        except DeclarationError as err:
            return [Problem(name, DECLARATION, str(err))]
        if differences:
            return [Problem(name, self.subject, f"outputs differ from {DECLARATION}: {'; '.join(differences)}")]
        with tempfile.TemporaryDirectory(prefix="verify_ts_") as tmp:
            try:
                scripted = self._torchscript(net, examples[0], Path(tmp))
                reloaded = [self._forward(scripted, example) for example in examples]
            except Exception as err:  # noqa: BLE001
                return [self._problem(f"TorchScript export ({self.decl.torchscript})", err)]
            problems = [
                Problem(name, self.subject, p)
                for e, r in zip(eager, reloaded, strict=True)
                for p in self._compare(e, r)
            ]
            if not problems and self.export_dir is not None:
                self._keep(Path(tmp) / "network.ts")
        return problems

    def _keep(self, traced: Path) -> None:
        """Copy the checked TorchScript file to ``export_dir/<bundle>/<net_id>.ts`` (atomically)."""
        target = self.export_dir / self.bundle.name / f"{self.decl.net_id}.ts"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(traced, tmp)
        self.notes.append(f"TorchScript written to {target}")


def check_large_files(bundle: Path) -> tuple[list[Problem], list[str]]:
    """(hash mismatches of local large files, notes on entries present without a hash)."""
    try:
        entries = read_large_files(bundle)
    except ValueError as err:
        return [Problem(bundle.name, "large_files.yml", str(err))], []
    problems, notes = [], []
    for entry in entries:
        try:
            if problem := entry.check(bundle):
                problems.append(Problem(bundle.name, "large_files.yml", problem))
            elif entry.local_path(bundle).exists() and not entry.hash_val:
                notes.append(f"large file {entry.path} is present but has no hash_val to check it against")
        except ValueError as err:
            problems.append(Problem(bundle.name, "large_files.yml", str(err)))
    return problems, notes


def check_metadata(bundle: Path) -> list[Problem]:
    path = bundle / "configs" / "metadata.json"
    return [Problem(bundle.name, "configs/metadata.json", p) for p in validate_metadata(path)]


# Orchestration ------------------------------------------------------------------------------------------


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI's bundle scripts log every argument (tensors included) at INFO: keep them to warnings."""
    quiet = {
        "monai.bundle": logging.WARNING,
        "monai.bundle.scripts": logging.WARNING,
        "monai.bundle.workflows": logging.ERROR,
    }
    loggers = [logging.getLogger(n) for n in quiet]
    levels = [lg.level for lg in loggers]
    for lg, level in zip(loggers, quiet.values(), strict=True):
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class BundleVerifier:
    """Runs the selected checks on one bundle folder and prints a line per check."""

    def __init__(
        self,
        bundle: Path,
        datasets: DatasetCache,
        checks: Sequence[str] = CHECKS,
        networks: Sequence[str] | None = None,
        device: str = "cpu",
        echo: Callable[[str], None] = print,
        torchscript_dir: Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.datasets = datasets
        self.checks = checks
        self.networks = networks
        self.device = device
        self.echo = echo
        self.torchscript_dir = torchscript_dir

    def _timed(self, label: str, report: Report, run: Callable[[], list[Problem]]) -> None:
        start = time.perf_counter()
        try:
            problems = run()
        except Exception as err:  # noqa: BLE001 - a crash of one check must not hide the others
            problems = [Problem(self.bundle.name, label, f"check crashed: {_error_text(err)}")]
            logging.getLogger(__name__).debug(traceback.format_exc())
        report.problems += problems
        status = "ok" if not problems else f"FAILED ({len(problems)})"
        self.echo(f"{self.bundle.name}: {label}: {status} ({time.perf_counter() - start:.1f} s)")

    def run(self) -> Report:
        report = Report()
        name = self.bundle.name
        if "metadata" in self.checks:
            self._timed("metadata", report, lambda: check_metadata(self.bundle))
        if "large_files" in self.checks:

            def large() -> list[Problem]:
                problems, notes = check_large_files(self.bundle)
                report.notes += [f"{name}: {n}" for n in notes]
                return problems

            self._timed("large files", report, large)
        if not {"properties", "networks"} & set(self.checks):
            return report
        try:
            declaration = Declaration.load(self.bundle)
        except DeclarationError as err:
            report.problems.append(Problem(name, DECLARATION, str(err)))
            self.echo(f"{name}: {DECLARATION}: FAILED")
            return report
        if "properties" in self.checks:
            with tempfile.TemporaryDirectory(prefix=f"verify_{name}_") as tmp:
                check = PropertiesCheck(self.bundle, declaration.properties, self.datasets, Path(tmp))
                self._timed("properties", report, check.run)
        if "networks" in self.checks:
            selected = [n for n in declaration.networks if self.networks is None or n.net_id in self.networks]
            if self.networks is not None and (unknown := set(self.networks) - {n.net_id for n in declaration.networks}):
                report.problems.append(Problem(name, DECLARATION, f"no declared network {sorted(unknown)}"))
            for net in selected:
                check = NetworkCheck(self.bundle, net, self.device, self.torchscript_dir)
                self._timed(f"network {net.net_id} ({net.torchscript})", report, check.run)
                report.notes += [f"{name}: network {net.net_id}: {n}" for n in check.notes]
        return report


def verify_bundles(
    bundles: str | Sequence[str] | None = None,
    bundles_dir: str = str(REPO_ROOT / "bundles"),
    checks: str | Sequence[str] | None = None,
    networks: str | Sequence[str] | None = None,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
    torchscript_dir: str | None = None,
) -> Report:
    """Verify the bundles (all under ``bundles_dir`` unless ``bundles`` names some); return every problem found.

    Args:
        bundles: bundle names, comma-separated or a list; default all.
        bundles_dir: the folder holding one folder per bundle.
        checks: a subset of ``metadata, large_files, properties, networks``; default all.
        networks: restrict the network checks to these config ids.
        device: where networks run for the in/out and TorchScript checks.
        torchscript_dir: keep each network's checked TorchScript file as ``<dir>/<bundle>/<net_id>.ts`` (traced or
            scripted as ``configs/verify.json`` declares, with the bundle's weights and MONAI's bundle metadata), e.g.
            for MONAI Deploy.
    """
    selected = parse_names(checks) or list(CHECKS)
    if unknown := sorted(set(selected) - set(CHECKS)):
        raise ValueError(f"unknown checks {unknown}: choose among {', '.join(CHECKS)}")
    folders = discover_bundles(bundles_dir, parse_names(bundles))
    if not folders:
        raise ValueError(f"no bundle (a folder with configs/metadata.json) under {bundles_dir}")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="verify_data_") as data_root, _quiet_monai():
        datasets = DatasetCache(Path(data_root))
        for folder in folders:
            export = None if torchscript_dir is None else Path(torchscript_dir).resolve()
            verifier = BundleVerifier(folder.resolve(), datasets, selected, parse_names(networks), device, echo, export)
            result = verifier.run()
            report.problems += result.problems
            report.notes += result.notes
    return report


def main(
    bundles: str | Sequence[str] | None = None,
    bundles_dir: str = str(REPO_ROOT / "bundles"),
    checks: str | Sequence[str] | None = None,
    networks: str | Sequence[str] | None = None,
    device: str = "cpu",
    torchscript_dir: str | None = None,
) -> None:
    """Command line: print a line per check, then notes and problems; exit 1 if any check failed.

    ``--torchscript_dir DIR --checks networks`` exports every declared network to TorchScript (checked against the
    eager network) as ``DIR/<bundle>/<net_id>.ts``.
    """
    start = time.perf_counter()
    try:
        report = verify_bundles(bundles, bundles_dir, checks, networks, device, torchscript_dir=torchscript_dir)
    except ValueError as error:
        print(f"verify_bundles: error: {error}", file=sys.stderr)
        sys.exit(2)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"FAILED {problem}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    if report.problems:
        print(f"verify_bundles: {len(report.problems)} problem(s) ({elapsed:.0f} s)", file=sys.stderr)
        sys.exit(1)
    print(f"verify_bundles: all checks passed ({elapsed:.0f} s)")


def cli() -> None:
    """Entry point of ``verify-bundles`` and ``python -m tools.verify_bundles``."""
    import fire

    fire.Fire(main, name="verify_bundles")
