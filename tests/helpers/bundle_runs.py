"""Running a bundle's configs in tests: in-process workflows, subprocess environments, error chains."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from monai.bundle import ConfigWorkflow

from tests.helpers import REPO_ROOT


def bundle_env() -> dict[str, str]:
    """Environment for a bundle subprocess: the repository importable, no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def workflow(bundle: Path, config: str | Sequence[str], workflow_type: str, **overrides) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of ``bundle``'s ``configs/<config>`` (a list is layered in order)."""
    names = [config] if isinstance(config, str) else list(config)
    wf = ConfigWorkflow(
        config_file=[str(bundle / "configs" / name) for name in names],
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        logging_file=False,
        bundle_root=str(bundle),
        **overrides,
    )
    wf.initialize()
    return wf


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """The error and every error it was raised from (MONAI wraps config errors)."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def error_text(err: BaseException) -> str:
    return "".join(str(e) for e in error_chain(err))


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` with its bytes (to prove a run changed nothing)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_at_checkpoint(args: Sequence[str], checkpoint: Path, timeout: float = 240) -> None:
    """Start a training command and kill it (SIGKILL, as a crash or a lost node would) once ``checkpoint`` exists."""
    proc = subprocess.Popen(
        list(args), cwd=REPO_ROOT, env=bundle_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "training ended before it could be interrupted"
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
