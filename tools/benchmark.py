"""Benchmarks of the bundles' sampling and training against anchor-style baselines, in one process, interleaved.

Usage (from the repository root; ``benchmark-bundles`` once installed)::

    python tools/benchmark.py sampling --bundle brain_t1_ldm --num_samples 8 --steps 50 --guidance 3 --repeats 5
    python tools/benchmark.py sampling --bundle flair_to_t1_controlnet --num_samples 8 --steps 50 --repeats 5
    python tools/benchmark.py training --bundle brain_t1_ldm --batch_size 32 --iterations 5 --repeats 3

Each prints a markdown table (median seconds per image, min/max, ratio to the baseline, peak memory, and how far
each candidate's images are from the bundle's) with the machine it ran on, and with ``--output FILE`` writes the
full report as JSON. One thread by default (``--threads``): on a small shared CPU one thread is both the fastest
and the least noisy. What the candidates are: ``tools/benchmarks/sampling.py`` and ``tools/benchmarks/training.py``.
Times are for comparison within one run; they are never asserted in tests.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire

from common.io.atomic import write_json

REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _bundle_root(bundle: str, bundles_dir: str | None, config: str) -> Path:
    """The folder of ``bundle``, checked to hold ``configs/<config>`` before anything is loaded."""
    root = Path(bundles_dir) if bundles_dir else REPO_BUNDLES
    path = root / bundle
    if not (path / "configs" / config).is_file():
        known = sorted(p.name for p in root.iterdir() if (p / "configs" / config).is_file()) if root.is_dir() else []
        raise ValueError(f"No bundle {bundle!r} with configs/{config} under {root}; known: {known}.")
    return path


def _check_counts(**counts: Any) -> None:
    """Refuse a count that is not a positive integer, naming it, before any loading."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _command(kind: str, arguments: dict[str, Any]) -> str:
    """The command line that reproduces a run."""
    options = " ".join(f"--{k} {v}" for k, v in arguments.items() if v is not None)
    return f"benchmark-bundles {kind} {options}"


def _report(kind: str, bundle: str, command: str, settings: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    from tools.benchmarks.timing import machine_info, now

    return {
        "benchmark": kind,
        "bundle": bundle,
        "command": command,
        "date": now(),
        "machine": machine_info(),
        "settings": settings,
        **result,
    }


def _settings_text(settings: dict[str, Any]) -> str:
    """``"steps 50, guidance 3.0, prompt 'a brain'"``: settings that have a value, strings quoted (they may be empty)."""
    return ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}" for k, v in settings.items() if v is not None)


def report_markdown(report: dict[str, Any], table: str) -> str:
    """Heading, command, machine and the table of a report, as printed and as pasted into ``docs/benchmarks.md``."""
    m = report["machine"]
    bf16 = ", ".join(m["bf16_cpu_flags"]) or "none"
    return "\n".join(
        [
            f"### {report['benchmark']}: {report['bundle']}",
            "",
            f"`{report['command']}`",
            "",
            f"{report['date']}; {m['cpu_model']} ({m['logical_cpus']} logical CPUs, {m['cpu_capability']}, native bf16: "
            f"{bf16}); {m['torch_threads']} thread(s); torch {m['torch']}, MONAI {m['monai']}, "
            f"Python {m['python']}. Settings: {_settings_text(report['settings'])}.",
            "",
            table,
            "",
        ]
    )


def _finish(report: dict[str, Any], table: str, output: str | None) -> None:
    print(report_markdown(report, table))
    if output:
        write_json(output, report)
        print(f"Report written to {output}")


def sampling(
    bundle: str = "brain_t1_ldm",
    num_samples: int = 8,
    steps: int = 50,
    guidance: float | None = None,
    eta: float = 0.0,
    repeats: int = 5,
    threads: int = 1,
    seed: int = 0,
    output: str | None = None,
    bundles_dir: str | None = None,
    compile: bool = False,
) -> None:
    """Time the bundle's sampler against the zoo-style, seed-style and MONAI-inferer loops on the same noise.

    ``guidance`` ``None`` keeps the bundle's configured guidance scale; ``eta`` 0 (the anchors' DDIM) makes every
    candidate compute the same images, which the report checks. ``compile`` adds the config's default sampler with
    ``--compile True`` (its compilation, minutes on a CPU, is the warm-up).
    """
    from tools.benchmarks.sampling import (
        benchmark_sampling,
        load_sampling_setup,
        sampling_settings,
        sampling_table,
        unexpected_differences,
    )
    from tools.benchmarks.timing import set_threads

    _check_counts(num_samples=num_samples, steps=steps, repeats=repeats, threads=threads)
    root = _bundle_root(bundle, bundles_dir, "inference.json")
    set_threads(threads)
    setup = load_sampling_setup(root, num_samples, steps, guidance, eta, seed)
    result = benchmark_sampling(setup, repeats, compile=bool(compile))
    arguments = {
        "bundle": bundle,
        "num_samples": num_samples,
        "steps": steps,
        "guidance": guidance,
        "eta": eta,
        "repeats": repeats,
        "threads": threads,
        "seed": seed,
        "compile": bool(compile),
    }
    report = _report("sampling", bundle, _command("sampling", arguments), sampling_settings(setup, repeats), result)
    _finish(report, sampling_table(result), output)
    for name in unexpected_differences(result["agreement"]):
        diff = result["agreement"][name]["max_abs_diff_vs_bundle"]
        print(f"WARNING: {name} should give the bundle's images but differs by {diff:.3g}", file=sys.stderr)


def training(
    bundle: str = "brain_t1_ldm",
    batch_size: int = 32,
    iterations: int = 5,
    repeats: int = 3,
    threads: int = 1,
    seed: int = 0,
    output: str | None = None,
    bundles_dir: str | None = None,
    compile: bool = False,
    dataset_size: int = 800,
) -> None:
    """Time the bundle's diffusion training iterations against the seed-style step on the same batches.

    ``compile`` adds the bf16 trainer with ``torch.compile`` (its compilation, minutes on a CPU, is the warm-up).
    ``dataset_size`` (default: the demo's 800 training slices; 0 leaves it out) adds the bf16 trainer reading from
    the config's own data loader over a data set of that many slices, written to a temporary folder.
    """
    from tools.benchmarks.timing import set_threads
    from tools.benchmarks.training import benchmark_training, load_training_setup, training_settings, training_table

    _check_counts(batch_size=batch_size, iterations=iterations, repeats=repeats, threads=threads)
    if dataset_size != 0:
        _check_counts(dataset_size=dataset_size)
        if dataset_size < batch_size * iterations:
            raise ValueError(
                f"`dataset_size` {dataset_size} is less than the {batch_size * iterations} slices of "
                f"{iterations} batches of {batch_size}: give at least that many, or 0 to leave the data loader out."
            )
    root = _bundle_root(bundle, bundles_dir, "train_diffusion.json")
    set_threads(threads)
    with tempfile.TemporaryDirectory(prefix="benchmark_data_") as work_dir:
        setup = load_training_setup(root, batch_size, iterations, seed, dataset_size=dataset_size, work_dir=work_dir)
        result = benchmark_training(setup, repeats, compile=bool(compile))
    arguments = {
        "bundle": bundle,
        "batch_size": batch_size,
        "iterations": iterations,
        "repeats": repeats,
        "threads": threads,
        "seed": seed,
        "compile": bool(compile),
        "dataset_size": dataset_size,
    }
    report = _report("training", bundle, _command("training", arguments), training_settings(setup, repeats), result)
    _finish(report, training_table(result), output)


def cli() -> None:
    """Entry point of ``benchmark-bundles``."""
    fire.Fire({"sampling": sampling, "training": training})


if __name__ == "__main__":
    cli()
