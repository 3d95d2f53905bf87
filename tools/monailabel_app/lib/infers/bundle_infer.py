"""MONAI Label infer tasks that run one of the project's bundles through ``common.bundle.runner.run_bundle``.

* :class:`BundleTranslationTask`: the image the viewer shows (e.g. FLAIR) in, the bundle's output volume (e.g. the
  synthetic T1w, with the input's geometry) back;
* :class:`BundleGenerationTask`: a prompt in (the task's config options, shown by the viewer), generated images
  added to the datastore with their sidecar as image info, the first one sent back.

Request options (seed, steps, guidance, prompt) come from the task's ``config``, as MONAI Label's UI shows them;
only options the bundle declares reach it, checked by ``run_bundle`` before any work. Neither task samples itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from common.bundle.errors import root_cause, summary_line
from common.bundle.runner import BundleRun, run_bundle

logger = logging.getLogger(__name__)


def _hand_over(volume: Path, folder: Path) -> str:
    """A copy of ``volume`` outside the run ``folder``, which is removed: MONAI Label sends the file it is given and
    then deletes it."""
    handle, name = tempfile.mkstemp(suffix=".nii.gz", prefix="monailabel_result_")
    with os.fdopen(handle, "wb") as copy:
        copy.write(volume.read_bytes())
    shutil.rmtree(folder, ignore_errors=True)
    return name


class _BundleTask(InferTask):
    """What both tasks share: the bundle, its options shown as the task's config, and the run."""

    def __init__(self, bundle_dir: str | Path, description: str, config: Mapping[str, Any], dimension: int) -> None:
        super().__init__(
            type=InferType.OTHERS, labels=None, dimension=dimension, description=description, config=dict(config)
        )
        self.bundle_dir = Path(bundle_dir)

    def is_valid(self) -> bool:
        return (self.bundle_dir / "configs" / "inference.json").is_file()

    def options(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The task's config options (the bundle's options it offers), with the request's values over the defaults."""
        return {key: request.get(key, default) for key, default in self._config.items()}

    def run(self, overrides: Mapping[str, Any]) -> tuple[BundleRun, Path]:
        """Run the bundle into a fresh temporary folder; return the run and the folder (the caller removes it).

        Bad input (an option out of range, an image the bundle refuses) answers HTTP 422 with the reason, which
        MONAI Label's endpoint passes to the viewer; its own handling would answer a bare 500.
        """
        folder = Path(tempfile.mkdtemp(prefix=f"monailabel_{self.bundle_dir.name}_"))
        try:
            return run_bundle(self.bundle_dir, folder, {"progress": False, **overrides}), folder
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)
            cause = root_cause(err)
            if isinstance(cause, ValueError | FileNotFoundError):  # the request's fault, not the server's
                raise HTTPException(status_code=422, detail=summary_line(err)) from err
            raise


class BundleTranslationTask(_BundleTask):
    """Image-to-image bundle: ``request["image"]`` (the viewer's volume) -> the bundle's output volume."""

    def __init__(self, bundle_dir: str | Path, description: str, config: Mapping[str, Any], dimension: int = 3) -> None:
        super().__init__(bundle_dir, description, config, dimension)

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        result, folder = self.run({**self.options(request), "input_image": str(request["image"])})
        ((volume, sidecar),) = result.outputs(".nii.gz")
        return _hand_over(volume, folder), {"sidecar": sidecar}


class BundleGenerationTask(_BundleTask):
    """Text-to-image bundle: the prompt of the task's config -> images added to ``datastore`` with their sidecar
    as image info; the first image is sent back, and the JSON lists the new image ids."""

    def __init__(
        self,
        bundle_dir: str | Path,
        datastore: Datastore,
        description: str,
        config: Mapping[str, Any],
        dimension: int = 2,
    ) -> None:
        super().__init__(bundle_dir, description, config, dimension)
        self.datastore = datastore

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        result, folder = self.run(self.options(request))
        volumes = result.outputs(".nii.gz")
        added = [
            self.datastore.add_image(
                volume.name.removesuffix(".nii.gz"), str(volume), {"generated_by": self.bundle_dir.name, **sidecar}
            )
            for volume, sidecar in volumes
        ]
        name = _hand_over(volumes[0][0], folder)
        logger.info("%s added %d generated images to the datastore: %s", self.bundle_dir.name, len(added), added)
        return name, {"added_images": added, "sidecars": result.sidecars}
