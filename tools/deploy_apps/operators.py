"""MONAI Deploy operators around a bundle run: DICOM volume to NIfTI, the bundle run, and a derived DICOM series.

The SDK's own operators read DICOM (``DICOMDataLoaderOperator``, ``DICOMSeriesSelectorOperator``,
``DICOMSeriesToVolumeOperator``); these three take it from there:

* :class:`VolumeToNiftiOperator`: the SDK's ``Image`` (voxels ``(D, H, W)``, RAS affine of the ``(W, H, D)`` order)
  -> a NIfTI file, the input a bundle's ``inference.json`` reads;
* :class:`BundleInferenceOperator`: ``run_bundle(bundle, output, {"input_image": path, ...})`` (or the options of
  a text request) -> the files it wrote;
* :class:`DerivedSeriesWriterOperator`: the bundle's NIfTI output -> a new DICOM series in the source study, one
  instance per source slice, with the source's geometry, image type DERIVED\\SECONDARY and a statement that the
  images are synthetic;
* :class:`SecondaryCaptureWriterOperator`: each generated image -> a DICOM Secondary Capture object (highdicom) in
  a new study, saying that it is synthetic and what prompt made it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
from monai.deploy.core import ConditionType, Fragment, Image, Operator, OperatorSpec
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from common.bundle.runner import BundleRun, run_bundle

logger = logging.getLogger(__name__)

#: Stored value of intensity 1.0 in the derived series (12 bits; RescaleSlope maps it back to [0, 1]).
STORED_MAX = 4095


class VolumeToNiftiOperator(Operator):
    """Write the SDK ``Image`` received on ``image`` as ``<folder>/<file_stem>.nii.gz``; emit the path on
    ``nifti_path``."""

    def __init__(self, fragment: Fragment, *args: Any, folder: Path, file_stem: str = "input", **kwargs: Any) -> None:
        self.folder = Path(folder)
        self.file_stem = file_stem
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.output("nifti_path")

    def compute(self, op_input, op_output, context) -> None:
        image: Image = op_input.receive("image")
        metadata = image.metadata()
        if "affine" not in metadata:
            raise ValueError("The DICOM series gave no affine (ImageOrientationPatient/ImagePositionPatient missing).")
        voxels = np.asarray(image.asnumpy(), dtype=np.float32)  # (D, H, W): slices, rows, columns
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.file_stem}.nii.gz"
        nib.save(nib.Nifti1Image(voxels.transpose(2, 1, 0), np.asarray(metadata["affine"], dtype=np.float64)), path)
        op_output.emit(str(path), "nifti_path")


class ValueSourceOperator(Operator):
    """Emit one value on ``value`` (the start of a graph whose input is known when it is composed)."""

    def __init__(self, fragment: Fragment, *args: Any, value: Any, **kwargs: Any) -> None:
        self.value = value
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("value")

    def compute(self, op_input, op_output, context) -> None:
        op_output.emit(self.value, "value")


class BundleInferenceOperator(Operator):
    """Run a bundle's ``inference.json`` for the request received on ``request``; emit the ``BundleRun`` on
    ``result``.

    A request is a mapping of the bundle's options (``{"prompt": ..., "seed": ...}``), or a path, which is given as
    the option ``input_key`` (``input_image`` for image-to-image bundles).

    Args:
        bundle_dir: the bundle folder.
        output_dir: where the bundle writes (NIfTI, PNG, sidecar).
        overrides: options under every request (seed, steps, guidance, device).
        input_key: the option a path request sets.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        bundle_dir: Path,
        output_dir: Path,
        overrides: Mapping[str, Any] | None = None,
        input_key: str = "input_image",
        **kwargs: Any,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.output_dir = Path(output_dir)
        self.overrides = dict(overrides or {})
        self.input_key = input_key
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("request")
        spec.output("result").condition(ConditionType.NONE)  # nothing downstream for NIfTI-only graphs

    def compute(self, op_input, op_output, context) -> None:
        request = op_input.receive("request")
        options = dict(request) if isinstance(request, Mapping) else {self.input_key: str(request)}
        result = run_bundle(self.bundle_dir, self.output_dir, {**self.overrides, **options})
        logger.info("%s wrote %s", self.bundle_dir.name, ", ".join(p.name for p in result.files))
        op_output.emit(result, "result")


class DerivedSeriesWriterOperator(Operator):
    """Write the bundle's NIfTI output as a new DICOM series of the source study, in ``output_dir/<series UID>/``.

    Receives ``result`` (the ``BundleRun``) and ``study_selected_series_list`` (the SDK's selection of the source
    series). Instance ``k`` copies the patient, study and geometry attributes of source slice ``k`` (the SDK's
    position order, that of the volume's last axis), with a new series and SOP instance UID, ImageType
    ``DERIVED\\SECONDARY``, a SeriesDescription and ImageComments that say the image is synthetic, and a
    ``SourceImageSequence`` pointing at the source slice.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_dir: Path,
        series_description: str,
        statement: str,
        **kwargs: Any,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.series_description = series_description
        self.statement = statement
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("result")
        spec.input("study_selected_series_list")

    def compute(self, op_input, op_output, context) -> None:
        result: BundleRun = op_input.receive("result")
        selection = op_input.receive("study_selected_series_list")
        sources = [i.get_native_sop_instance() for i in selection[0].selected_series[0].series.get_sop_instances()]
        ((output, _),) = result.outputs(".nii.gz")
        volume = np.asarray(nib.load(output).dataobj, dtype=np.float32)
        if volume.ndim == 2:
            volume = volume[..., None]
        if volume.shape[-1] != len(sources):
            raise ValueError(f"The output has {volume.shape[-1]} slices, the source series {len(sources)}.")
        self.write(volume, sources)

    def write(self, volume: np.ndarray, sources: list[Dataset]) -> list[Path]:
        """Volume ``(W, H, S)`` in [0, 1] -> one derived instance per source slice; returns the files."""
        series_uid = hd.UID()
        folder = self.output_dir / str(series_uid)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for k, source in enumerate(sources):
            instance = self._instance(volume[..., k].T, source, series_uid)
            path = folder / f"{k:04d}.dcm"
            instance.save_as(path, enforce_file_format=True)
            written.append(path)
        logger.info("Wrote the derived series %s (%d instances) to %s", series_uid, len(written), folder)
        return written

    def _instance(self, pixels: np.ndarray, source: Dataset, series_uid: str) -> Dataset:
        derived = Dataset()
        for keyword in _COPIED:
            if keyword in source:
                setattr(derived, keyword, copy.deepcopy(getattr(source, keyword)))
        derived.SOPClassUID = source.SOPClassUID
        derived.SOPInstanceUID = hd.UID()
        derived.SeriesInstanceUID = series_uid
        derived.SeriesNumber = int(getattr(source, "SeriesNumber", 0) or 0) + 1000
        derived.SeriesDescription = self.series_description[:64]
        derived.ImageType = ["DERIVED", "SECONDARY"]
        derived.ImageComments = self.statement[:10240]
        derived.DerivationDescription = self.statement[:1024]
        derived.BurnedInAnnotation = "NO"
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        derived.SourceImageSequence = DicomSequence([reference])
        derived.SamplesPerPixel = 1
        derived.PhotometricInterpretation = "MONOCHROME2"
        derived.Rows, derived.Columns = pixels.shape
        derived.BitsAllocated, derived.BitsStored, derived.HighBit, derived.PixelRepresentation = 16, 12, 11, 0
        derived.RescaleIntercept, derived.RescaleSlope = 0, 1 / STORED_MAX
        derived.PixelData = np.round(np.clip(pixels, 0, 1) * STORED_MAX).astype(np.uint16).tobytes()
        derived.file_meta = _file_meta(derived)
        return derived


def _file_meta(dataset: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


#: Attributes a derived instance takes from its source slice: patient, study, frame of reference and geometry.
_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "Modality", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "SliceLocation", "InstanceNumber", "Manufacturer",
)  # fmt: skip


def patient_orientation_of(nifti: Path) -> tuple[str, str]:
    """DICOM PatientOrientation of the bundle's PNG of a 2D NIfTI output (the PNG is the array transposed: its
    columns follow the array's first axis, its rows the second), from the NIfTI's axis codes."""
    codes = nib.aff2axcodes(nib.load(nifti).affine)
    dicom = {"R": "R", "L": "L", "A": "A", "P": "P", "S": "H", "I": "F"}
    return dicom[codes[0]], dicom[codes[1]]


class SecondaryCaptureWriterOperator(Operator):
    """Write every generated image of the ``BundleRun`` received on ``result`` as a DICOM Secondary Capture object.

    One new study and series per run, in ``output_dir/<series UID>/``; the 8-bit PNG the bundle wrote is the pixel
    data, with its pixel spacing. ``patient`` gives PatientID/PatientName (default: a synthetic patient), and
    ``patient_orientation`` the image's orientation (``None``: read from each image's NIfTI axes). Every object
    says in SeriesDescription and ImageComments that it is synthetic, with the prompt that made it.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_dir: Path,
        statement: str,
        patient: Mapping[str, str] | None = None,
        patient_orientation: tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.statement = statement
        self.patient = {"id": "SYNTHETIC", "name": "SYNTHETIC^IMAGE", **(patient or {})}
        self.patient_orientation = patient_orientation
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("result")

    def compute(self, op_input, op_output, context) -> None:
        self.write(op_input.receive("result"))

    def write(self, result: BundleRun) -> list[Path]:
        from PIL import Image as PILImage

        study, series = hd.UID(), hd.UID()
        folder = self.output_dir / str(series)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for k, (png, sidecar) in enumerate(result.outputs(".png")):
            orientation = self.patient_orientation or patient_orientation_of(png.with_suffix("").with_suffix(".nii.gz"))
            prompt = str(sidecar.get("prompt", ""))
            image = hd.sc.SCImage(
                pixel_array=np.asarray(PILImage.open(png).convert("L")),
                photometric_interpretation="MONOCHROME2",
                bits_allocated=8,
                coordinate_system="PATIENT",
                study_instance_uid=study,
                series_instance_uid=series,
                series_number=1,
                sop_instance_uid=hd.UID(),
                instance_number=k + 1,
                manufacturer="MONAI generative bundles",
                patient_id=self.patient["id"],
                patient_name=self.patient["name"],
                pixel_spacing=tuple(float(v) for v in sidecar.get("spacing_mm", (1.0, 1.0))),
                patient_orientation=orientation,
            )
            image.SeriesDescription = f"SYNTHETIC {sidecar.get('bundle', '')}"[:64]
            image.ImageComments = f"{self.statement} Prompt: {prompt} Seed: {sidecar.get('seed')}"[:10240]
            image.BurnedInAnnotation = "NO"
            path = folder / f"{k:04d}.dcm"
            image.save_as(path, enforce_file_format=True)
            written.append(path)
        logger.info("Wrote %d Secondary Capture objects to %s", len(written), folder)
        return written
