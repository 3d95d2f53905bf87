"""MONAI Deploy application: FLAIR in (a NIfTI file, or a DICOM series), synthetic T1w out, by flair_to_t1_controlnet.

* NIfTI input (``-i`` a ``.nii``/``.nii.gz`` file, or a folder holding one): the bundle's NIfTI, PNG and sidecar
  outputs in ``-o``.
* DICOM input (``-i`` a folder of DICOM files): the SDK reads the study, selects the MR series, and turns it into a
  volume; the bundle translates it, and a new DICOM series of the T1w result, in the source study, is written to
  ``-o``/``dicom/<series UID>/`` beside the NIfTI outputs.

Run it in the Deploy environment (``make deploy-setup``), from the repository root::

    .venv-deploy/bin/python -m tools.deploy_apps.flair_to_t1.app -i FLAIR_DICOM_DIR -o OUT [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, DICOMSeriesToVolumeOperator

from tools.deploy_apps.operators import (
    BundleInferenceOperator,
    DerivedSeriesWriterOperator,
    ValueSourceOperator,
    VolumeToNiftiOperator,
)

BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "flair_to_t1_controlnet"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Which series of a study is the FLAIR input: an MR series (the first, when there are several).
SELECTION_RULES = '{"selections": [{"name": "FLAIR", "conditions": {"Modality": "(?i)MR"}}]}'
STATEMENT = (
    "SYNTHETIC IMAGE: T1-weighted image generated from the FLAIR series by the flair_to_t1_controlnet MONAI bundle "
    "(a generative model). Not acquired from the patient; not for diagnosis."
)


def find_nifti(path: Path) -> Path | None:
    """``path`` if it is a NIfTI file, the one NIfTI file of a folder, else ``None`` (DICOM input)."""
    if path.is_file():
        return path if path.name.lower().endswith(NIFTI_SUFFIXES) else None
    found = sorted(p for p in path.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES))
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} NIfTI files; give one file with -i.")
    return found[0] if found else None


class FlairToT1App(Application):
    """FLAIR (NIfTI or DICOM) -> synthetic T1w (NIfTI, and a DICOM series for DICOM input).

    Args:
        argv: ``[program, "-i", INPUT, "-o", OUTPUT]`` as the SDK's command line takes them.
        bundle_dir: the flair_to_t1_controlnet bundle (default: the repository's).
        overrides: options of the bundle's ``inference.json`` (seed, num_inference_steps, device, ...).
    """

    def __init__(
        self, argv: list[str] | None = None, bundle_dir: Path = BUNDLE, overrides: Mapping[str, Any] | None = None
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.overrides = dict(overrides or {})
        # The SDK's own options (-i, -o, ...) are parsed in compose(); Holoscan's parser would drop argv[0].
        self.command_line = list(argv) if argv is not None else None
        super().__init__()

    def compose(self) -> None:
        context = Application.init_app_context(self.command_line)
        source, output = Path(context.input_path), Path(context.output_path)
        translate = BundleInferenceOperator(
            self, bundle_dir=self.bundle_dir, output_dir=output, overrides=self.overrides, name="translate"
        )
        nifti = find_nifti(source)
        if nifti is not None:
            start = ValueSourceOperator(self, CountCondition(self, 1), value=str(nifti), name="nifti_input")
            self.add_flow(start, translate, {("value", "request")})
            return
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=source, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=SELECTION_RULES, name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        to_nifti = VolumeToNiftiOperator(self, folder=output / "input", file_stem="FLAIR", name="to_nifti")
        writer = DerivedSeriesWriterOperator(
            self,
            output_dir=output / "dicom",
            series_description="SYNTHETIC T1w from FLAIR (flair_to_t1_controlnet)",
            statement=STATEMENT,
            name="dicom_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, to_nifti, {("image", "image")})
        self.add_flow(to_nifti, translate, {("nifti_path", "request")})
        self.add_flow(translate, writer, {("result", "result")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--seed", type=int, default=0)
    extra.add_argument("--num_inference_steps", type=int, default=None)
    known, rest = extra.parse_known_args(argv[1:])
    overrides = {"seed": known.seed, "progress": False}
    if known.num_inference_steps is not None:
        overrides["num_inference_steps"] = known.num_inference_steps
    FlairToT1App([argv[0], *rest], overrides=overrides).run()


if __name__ == "__main__":
    main()
