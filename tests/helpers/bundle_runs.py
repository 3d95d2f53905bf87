"""Running a bundle's configs in tests: in-process workflows, subprocess environments, error chains."""

from __future__ import annotations

import os
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
