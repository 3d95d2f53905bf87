"""common.data.condition_images: reading and checking a condition slice or volume."""

from __future__ import annotations

import numpy as np
import pytest
from monai.data import PILWriter

from common.data.condition_images import load_condition_image, to_unit_range
from tests.conftest import IMAGE_SIZE
from tests.helpers.fakes import write_bytes, write_nifti


def test_load_slice_and_volume(tmp_path):
    rng = np.random.default_rng(0)
    s = load_condition_image(write_nifti(tmp_path / "a.nii.gz", rng.random((16, 16))), IMAGE_SIZE, "FLAIR")
    assert s.kind == "slice" and s.slices.shape == (1, 1, 16, 16) and not s.rescaled
    v = load_condition_image(write_nifti(tmp_path / "v.nii.gz", rng.random((16, 16, 5)) * 800), IMAGE_SIZE, "FLAIR")
    assert v.kind == "volume" and v.slices.shape == (5, 1, 16, 16) and v.rescaled
    assert 0 <= float(v.slices.min()) and float(v.slices.max()) <= 1
    assert v.stem == "v"


def test_to_unit_range_keeps_unit_data():
    x = np.linspace(0, 1, 10, dtype=np.float32)
    same, rescaled = to_unit_range(x)
    assert np.array_equal(same, x) and not rescaled


def test_png_input(tmp_path):
    writer = PILWriter(output_dtype=np.uint8, scale=255)
    array = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    writer.set_data_array(array[None], channel_dim=0, squeeze_end_dims=True)
    writer.set_metadata({"spatial_shape": array.shape})
    writer.write(str(tmp_path / "x.png"), verbose=False)
    c = load_condition_image(tmp_path / "x.png", IMAGE_SIZE, "FLAIR")
    assert c.kind == "slice" and c.affine is None
    # Same orientation as MONAI's writer: the 8-bit PNG reads back (robustly rescaled) as the array written.
    assert c.rescaled and np.abs(c.slices[0, 0].numpy() - array).max() < 0.02


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.nii.gz", "not found"),
        (lambda d: write_bytes(d / "x.txt", b"hello"), "Unsupported file type"),
        (lambda d: write_bytes(d / "x.nii.gz", b"not a nifti"), "Cannot read"),
        (lambda d: write_nifti(d / "big.nii.gz", np.ones((32, 16)) * np.arange(16)), "expects (16, 16)"),
        (lambda d: write_nifti(d / "nan.nii.gz", np.where(np.eye(16) > 0, np.nan, 0.5)), "NaN"),
        (lambda d: write_nifti(d / "4d.nii.gz", np.random.rand(16, 16, 3, 2)), "exactly one (FLAIR)"),
        (lambda d: write_nifti(d / "flat.nii.gz", np.zeros((16, 16))), "constant"),
    ],
)
def test_bad_condition_images(tmp_path, make, message):
    with pytest.raises(ValueError) as info:
        load_condition_image(make(tmp_path), IMAGE_SIZE, modality="FLAIR")
    assert message in str(info.value)


def _slice(tmp_path, name, affine, size=IMAGE_SIZE):
    array = np.zeros(size, dtype=np.float32)
    array[4:-4, 4:-4] = np.random.default_rng(0).random((size[0] - 8, size[1] - 8))
    return write_nifti(tmp_path / name, array, affine)


def test_spacing_and_axis_order_of_a_nifti_input_are_checked(tmp_path, caplog):
    two_mm = np.diag([2.0, 2.0, 2.0, 1.0])
    assert load_condition_image(_slice(tmp_path, "ok.nii.gz", two_mm), IMAGE_SIZE, "FLAIR", spacing=(2, 2)).kind
    with pytest.raises(ValueError, match=r"voxels of 1.00 x 1.00 mm, but the model was trained on 2.00 x 2.00 mm"):
        load_condition_image(_slice(tmp_path, "1mm.nii.gz", np.eye(4)), IMAGE_SIZE, "FLAIR", spacing=(2, 2))
    swapped = np.array([[0, 2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="array axes ARS"):
        load_condition_image(_slice(tmp_path, "swapped.nii.gz", swapped), IMAGE_SIZE, "FLAIR", spacing=(2, 2))
    flipped = np.diag([-2.0, 2.0, 2.0, 1.0])
    load_condition_image(_slice(tmp_path, "las.nii.gz", flipped), IMAGE_SIZE, "FLAIR", spacing=(2, 2))
    assert "left-right flipped" in caplog.text


def test_an_image_without_background_is_warned_about(tmp_path, caplog):
    photo = write_nifti(tmp_path / "photo.nii.gz", 0.2 + np.random.default_rng(1).random(IMAGE_SIZE) * 0.5)
    load_condition_image(photo, IMAGE_SIZE, "FLAIR")
    assert "does not look like a skull-stripped FLAIR slice" in caplog.text
