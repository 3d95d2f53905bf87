"""MONAI Deploy application: a request JSON in, generated images out (NIfTI, PNG, sidecar, DICOM Secondary Capture).

The request names a text-to-image bundle and its options, e.g.::

    {"bundle": "cxr_ldm", "prompt": "Small left pleural effusion.", "num_samples": 2, "seed": 0,
     "patient": {"id": "SYN-0001", "name": "SYNTHETIC^CXR"}}

``bundle`` is one of :data:`TEXT_BUNDLES` (default ``brain_t1_ldm``); every other key but ``patient`` is an option
of the bundle's ``inference.json``, checked against its ``configs/options.json`` before any work. The bundle's own
outputs go to ``-o``; each image is also written as a Secondary Capture object of a new study in
``-o``/``dicom/<series UID>/``. Run it in the Deploy environment (``make deploy-setup``), from the repository root::

    .venv-deploy/bin/python -m tools.deploy_apps.text_to_image.app -i REQUEST.json -o OUT
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from tools.deploy_apps.operators import BundleInferenceOperator, SecondaryCaptureWriterOperator, ValueSourceOperator

BUNDLES = Path(__file__).resolve().parents[3] / "bundles"
#: The text-to-image bundles this application serves, with the DICOM PatientOrientation of their images
#: (``None``: read from each output's NIfTI axes). A new bundle joins with a line here.
TEXT_BUNDLES: dict[str, tuple[str, str] | None] = {
    "brain_t1_ldm": None,
    "brain_unclip": None,
    "cxr_ldm": ("L", "F"),  # a frontal radiograph as displayed: patient's left on the right, feet at the bottom
}
STATEMENT = "SYNTHETIC IMAGE generated from text by a MONAI generative bundle; not acquired from a patient."


def read_request(path: Path) -> dict[str, Any]:
    """The request of ``path`` (a JSON file, or a folder holding exactly one), checked; raises ``ValueError``."""
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise ValueError(f"{path} holds {len(found)} JSON files; give one request file with -i.")
        path = found[0]
    try:
        request = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read the request {path}: {err}") from err
    if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
        raise ValueError(f'{path} must be a JSON object with a "prompt" (text), e.g. {{"prompt": "..."}}.')
    bundle = request.setdefault("bundle", "brain_t1_ldm")
    if bundle not in TEXT_BUNDLES:
        raise ValueError(f"Unknown bundle {bundle!r} in {path}: choose one of {', '.join(TEXT_BUNDLES)}.")
    patient = request.get("patient", {})
    if not isinstance(patient, dict) or set(patient) - {"id", "name"}:
        raise ValueError(f'"patient" in {path} must be an object with "id" and/or "name", got {patient!r}.')
    return request


class TextToImageApp(Application):
    """A request JSON -> a text-to-image bundle run -> its images, and DICOM Secondary Capture objects of them.

    Args:
        argv: ``[program, "-i", REQUEST, "-o", OUTPUT]`` as the SDK's command line takes them.
        bundles_dir: the folder holding the bundles (default: the repository's).
        overrides: options under every request (device, steps, ...).
    """

    def __init__(
        self, argv: list[str] | None = None, bundles_dir: Path = BUNDLES, overrides: dict[str, Any] | None = None
    ) -> None:
        self.bundles_dir = Path(bundles_dir)
        self.overrides = dict(overrides or {})
        self.command_line = list(argv) if argv is not None else None  # parsed in compose(), as in the FLAIR app
        super().__init__()

    def compose(self) -> None:
        context = Application.init_app_context(self.command_line)
        request, output = read_request(Path(context.input_path)), Path(context.output_path)
        bundle = request.pop("bundle")
        patient = request.pop("patient", {})
        start = ValueSourceOperator(self, CountCondition(self, 1), value=request, name="request")
        generate = BundleInferenceOperator(
            self,
            bundle_dir=self.bundles_dir / bundle,
            output_dir=output,
            overrides={"progress": False, **self.overrides},
            name="generate",
        )
        writer = SecondaryCaptureWriterOperator(
            self,
            output_dir=output / "dicom",
            statement=STATEMENT,
            patient=patient,
            patient_orientation=TEXT_BUNDLES[bundle],
            name="secondary_capture_writer",
        )
        self.add_flow(start, generate, {("value", "request")})
        self.add_flow(generate, writer, {("result", "result")})


if __name__ == "__main__":
    TextToImageApp().run()
