"""common.io.translated_images: the translation keeps the input's affine and header."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.condition_images import load_condition_image
from common.io.translated_images import TranslatedImageWriter
from tests.conftest import IMAGE_SIZE
from tests.helpers.fakes import FakeEngine, write_nifti


def test_writer_keeps_volume_affine_and_header(tmp_path):
    affine = np.array([[0, -2.0, 0, 10], [2.0, 0, 0, -5], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    src = write_nifti(tmp_path / "sub_FLAIR.nii.gz", np.random.rand(16, 16, 3), affine)
    cond = load_condition_image(src, IMAGE_SIZE, "FLAIR")
    writer = TranslatedImageWriter(
        cond, str(tmp_path / "out"), seed=3, spacing=(2, 2), suffix="T1w", sidecar={"bundle": "b"}
    )
    # slices arrive out of order and in two iterations
    for ks in ([2, 0], [1]):
        writer.collect(FakeEngine([{"slice": k} for k in ks], [{"pred": torch.full((1, 16, 16), k / 4)} for k in ks]))
    files = writer.write()
    out = nib.load(files[0])
    assert files[0].name == f"{writer.stem}.nii.gz" and len(files) == 1  # no PNG for a volume
    assert writer.stem.startswith("sub_FLAIR_T1w_seed3_")
    assert out.shape == (16, 16, 3) and np.allclose(out.affine, affine)
    assert out.header["descrip"].tobytes().startswith(b"test volume")
    assert np.allclose(out.get_fdata()[0, 0], [0, 0.25, 0.5])
    sidecar = json.loads((tmp_path / "out" / f"{writer.stem}.json").read_text())
    assert sidecar["num_slices"] == 3 and sidecar["bundle"] == "b" and sidecar["input_kind"] == "volume"


def test_writer_refuses_missing_slices(tmp_path):
    cond = load_condition_image(write_nifti(tmp_path / "v.nii.gz", np.random.rand(16, 16, 2)), IMAGE_SIZE, "FLAIR")
    writer = TranslatedImageWriter(cond, str(tmp_path / "out"), seed=0, spacing=(1, 1), suffix="T1w")
    writer.collect(FakeEngine([{"slice": 0}], [{"pred": torch.zeros(1, 16, 16)}]))
    with pytest.raises(RuntimeError, match="nothing written"):
        writer.write()
    assert not (tmp_path / "out").exists()


def test_two_inputs_of_the_same_name_or_other_settings_get_other_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_nifti(tmp_path / "a" / "flair.nii.gz", np.random.rand(16, 16, 1))
    b = write_nifti(tmp_path / "b" / "flair.nii.gz", np.random.rand(16, 16, 1))
    stems = {
        TranslatedImageWriter(
            load_condition_image(p, IMAGE_SIZE, "FLAIR"), str(tmp_path / "out"), 0, (1, 1), "T1w", sidecar=sidecar
        ).stem
        for p in (a, b)
        for sidecar in ({"conditioning_scale": 1.0}, {"conditioning_scale": 1.5})
    }
    assert len(stems) == 4


def test_existing_outputs_are_refused_before_any_work_unless_overwrite(tmp_path):
    cond = load_condition_image(write_nifti(tmp_path / "v.nii.gz", np.random.rand(16, 16, 1)), IMAGE_SIZE, "FLAIR")
    writer = TranslatedImageWriter(cond, str(tmp_path / "out"), seed=0, spacing=(1, 1), suffix="T1w")
    writer.collect(FakeEngine([{"slice": 0}], [{"pred": torch.zeros(1, 16, 16)}]))
    writer.write()
    with pytest.raises(FileExistsError, match="--overwrite True"):
        TranslatedImageWriter(cond, str(tmp_path / "out"), seed=0, spacing=(1, 1), suffix="T1w")
    TranslatedImageWriter(cond, str(tmp_path / "out"), seed=0, spacing=(1, 1), suffix="T1w", overwrite=True)


def test_nan_translation_is_refused_and_nothing_written(tmp_path):
    cond = load_condition_image(write_nifti(tmp_path / "v.nii.gz", np.random.rand(16, 16, 1)), IMAGE_SIZE, "FLAIR")
    writer = TranslatedImageWriter(cond, str(tmp_path / "out"), seed=0, spacing=(1, 1), suffix="T1w")
    writer.collect(FakeEngine([{"slice": 0}], [{"pred": torch.full((1, 16, 16), float("nan"))}]))
    with pytest.raises(ValueError, match="non-finite"):
        writer.write()
    assert not (tmp_path / "out").exists()
