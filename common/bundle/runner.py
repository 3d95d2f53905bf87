"""A bundle's inference config run as a function: what MONAI Label and MONAI Deploy integrations call.

:func:`run_bundle` runs ``configs/inference.json`` (or another config stack) of a bundle folder through MONAI's own
``ConfigWorkflow``, with overrides checked first against the bundle's declared options
(:func:`common.bundle.options.check_overrides`), into a fresh output folder, and returns the files it wrote and
their JSON sidecars. Integrations never re-implement sampling.

One process may serve several bundles (MONAI Label keeps imported modules between requests and unloads only
``scripts``). Every bundle imports the same top-level package ``common``; a bundle that carries another version of
it (a vendored copy in a downloaded zip) cannot get its own while another version is loaded, so it is refused
with both versions named, before anything runs (:func:`check_shared_package`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.bundle.options import check_overrides

SHARED_PACKAGE = "common"
_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


class SharedPackageVersionError(RuntimeError):
    """A bundle needs another version of ``common`` than the one already loaded in this process."""


@dataclass
class BundleRun:
    """What one run wrote: ``files`` (images, volumes; sorted) and the parsed ``sidecars``, in ``output_dir``."""

    output_dir: Path
    files: list[Path] = field(default_factory=list)
    sidecars: list[dict[str, Any]] = field(default_factory=list)

    def outputs(self, suffix: str = ".nii.gz") -> list[tuple[Path, dict[str, Any]]]:
        """The written files ending in ``suffix``, each with its sidecar (the one listing its name; ``{}`` if none).

        Raises:
            ValueError: the run wrote no such file.
        """
        sidecar_of = {name: sidecar for sidecar in self.sidecars for name in sidecar.get("files", [])}
        found = [(path, sidecar_of.get(path.name, {})) for path in self.files if path.name.endswith(suffix)]
        if not found:
            raise ValueError(f"The bundle run wrote no {suffix} file: {[path.name for path in self.files]}")
        return found


def bundle_shared_version(bundle_dir: str | Path) -> str | None:
    """The version of ``common`` a bundle carries (``common/VENDORED.json`` or ``common/__init__.py``), if any."""
    folder = Path(bundle_dir) / SHARED_PACKAGE
    record = folder / "VENDORED.json"
    if record.is_file():
        return str(json.loads(record.read_text())["version"])
    init = folder / "__init__.py"
    if init.is_file() and (match := _VERSION.search(init.read_text())):
        return match.group(1)
    return None


def check_shared_package(bundle_dir: str | Path) -> None:
    """Refuse a bundle whose ``common`` differs in version from the ``common`` this process has loaded."""
    loaded = sys.modules.get(SHARED_PACKAGE)
    needed = bundle_shared_version(bundle_dir)
    if loaded is None or needed is None:
        return
    have = getattr(loaded, "__version__", None)
    if have != needed:
        raise SharedPackageVersionError(
            f"Bundle {Path(bundle_dir).name} carries common {needed}, but this process has already loaded common "
            f"{have} (from {Path(loaded.__file__).parent}). Python holds one package of a name per process: serve "
            "bundles of the same common version together, or run this bundle in its own process."
        )


def run_bundle(
    bundle_dir: str | Path,
    output_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    config: str | Sequence[str] = "configs/inference.json",
) -> BundleRun:
    """Run a bundle's config stack with ``overrides`` into ``output_dir``; return what it wrote.

    Args:
        bundle_dir: the bundle folder (``configs/``, ``models/``, ...).
        output_dir: where outputs go; it must not hold earlier outputs of the same request (they are refused, as
            on the command line), so give each request its own folder.
        overrides: option values, e.g. ``{"prompt": "...", "seed": 3, "num_inference_steps": 50}`` or
            ``{"input_image": "/tmp/flair.nii.gz"}``; checked against ``configs/options.json`` first.
        config: config file(s) relative to ``bundle_dir``, layered in order.

    Raises:
        common.bundle.options.BundleOptionError: unknown options or values outside what the bundle declares.
        SharedPackageVersionError: the bundle needs another version of ``common`` than the loaded one.
    """
    from monai.bundle import ConfigWorkflow

    bundle = Path(bundle_dir).resolve()
    out = Path(output_dir).resolve()
    files = [str(bundle / c) for c in ([config] if isinstance(config, str) else config)]
    given = dict(overrides or {})
    check_overrides(files, given)
    check_shared_package(bundle)
    before = set(out.rglob("*")) if out.is_dir() else set()
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        **{**given, "bundle_root": str(bundle), "output_dir": str(out)},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    written = sorted(p for p in set(out.rglob("*")) - before if p.is_file())
    sidecars = [json.loads(p.read_text()) for p in written if p.suffix == ".json"]
    return BundleRun(out, [p for p in written if p.suffix != ".json"], sidecars)
