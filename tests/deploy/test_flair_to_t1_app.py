"""The FLAIR -> T1w MONAI Deploy application, run in-process on CPU: NIfTI in, and a DICOM series in and out."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.data.brain.phantoms import PhantomGeometry, write_phantom_dataset
from tools.deploy_apps.flair_to_t1.app import STATEMENT, FlairToT1App

FAST = {"num_inference_steps": 2, "progress": False, "seed": 0}


@pytest.fixture(scope="module")
def flair_volume(tmp_path_factory) -> Path:
    """A phantom subject's FLAIR slices stacked into one RAS NIfTI volume (80 x 112 x 3, 2 mm)."""
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(folder, 3, PhantomGeometry.demo(num_slices=3), seed=0, progress=False)
    slices = [nib.load(folder / "images" / f"sub-0000_slice-{k}_FLAIR.nii.gz") for k in range(3)]
    volume = np.stack([np.asarray(s.dataobj, dtype=np.float32) for s in slices], axis=-1)
    path = folder / "sub-0000_FLAIR.nii.gz"
    nib.save(nib.Nifti1Image(volume, slices[0].affine), path)
    return path


def write_dicom_series(volume_path: Path, folder: Path) -> list[Dataset]:
    """An axial MR series of a RAS NIfTI volume, one instance per slice, as a scanner would store it (LPS)."""
    image = nib.load(volume_path)
    volume, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in range(volume.shape[-1]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.Modality = "Phantom^Zero", "PHANTOM0", "MR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20261130", 3, k + 1
        ds.SeriesDescription, ds.ImageType = "FLAIR axial", ["ORIGINAL", "PRIMARY"]
        corner = affine @ np.array([0, 0, k, 1.0])
        ds.ImagePositionPatient = [float(-corner[0]), float(-corner[1]), float(corner[2])]  # RAS -> LPS
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]  # rows along R, columns along A
        ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 2.0
        pixels = np.round(volume[..., k].T * 4000).astype(np.uint16)  # (rows, columns) = (A-P, R-L)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


def test_a_nifti_flair_volume_gives_a_t1w_volume_with_its_geometry(flair_volume, tmp_path):
    out = tmp_path / "out"
    FlairToT1App(["app", "-i", str(flair_volume), "-o", str(out)], overrides=FAST).run()
    (written,) = out.glob("*.nii.gz")
    result, source = nib.load(written), nib.load(flair_volume)
    assert result.shape == source.shape == (80, 112, 3)
    np.testing.assert_allclose(result.affine, source.affine)
    assert len(list(out.glob("*.json"))) == 1


def test_a_dicom_flair_series_gives_a_derived_t1w_series_in_the_same_study(flair_volume, tmp_path):
    sources = write_dicom_series(flair_volume, tmp_path / "dicom_in")
    out = tmp_path / "out"
    FlairToT1App(["app", "-i", str(tmp_path / "dicom_in"), "-o", str(out)], overrides=FAST).run()

    # the SDK's series-to-volume gives back the volume's geometry, and the bundle keeps it
    (t1,) = out.glob("*.nii.gz")
    np.testing.assert_allclose(nib.load(t1).affine, nib.load(flair_volume).affine, atol=1e-4)
    (series_dir,) = (out / "dicom").iterdir()
    derived = [pydicom.dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]
    assert len(derived) == len(sources) == 3
    by_position = {tuple(round(float(v), 3) for v in s.ImagePositionPatient): s for s in sources}
    volume = np.asarray(nib.load(t1).dataobj, dtype=np.float32)
    for k, instance in enumerate(derived):
        source = by_position[tuple(round(float(v), 3) for v in instance.ImagePositionPatient)]
        assert instance.StudyInstanceUID == source.StudyInstanceUID and instance.PatientID == "PHANTOM0"
        assert instance.SeriesInstanceUID != source.SeriesInstanceUID == sources[0].SeriesInstanceUID
        assert (
            instance.SeriesInstanceUID == derived[0].SeriesInstanceUID
            and instance.SOPInstanceUID != source.SOPInstanceUID
        )
        assert list(instance.ImageType) == ["DERIVED", "SECONDARY"]
        assert instance.ImageComments == STATEMENT and "SYNTHETIC" in instance.SeriesDescription
        assert instance.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert list(instance.ImageOrientationPatient) == list(source.ImageOrientationPatient)
        assert (instance.Rows, instance.Columns) == (112, 80)
        stored = instance.pixel_array.astype(np.float32) * float(instance.RescaleSlope)
        np.testing.assert_allclose(stored, volume[..., k].T, atol=1 / 4095)


def test_a_volume_off_the_models_grid_is_refused_and_nothing_is_written(tmp_path):
    from tests.helpers.bundle_runs import error_text

    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(64, 64, 2).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as info:
        FlairToT1App(["app", "-i", str(path), "-o", str(out)], overrides=FAST).run()
    assert "has FLAIR slices of size (64, 64), but the model expects (80, 112)" in error_text(info.value)
    assert not list(out.rglob("*.nii.gz"))
