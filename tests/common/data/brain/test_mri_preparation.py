"""common.data.brain.mri_preparation and prepare-brain-mri: UK Biobank layout, on small NIfTI volumes the tests write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.brain.mri_preparation import (
    DEFAULT_CAPTION,
    DataPreparationError,
    crop_or_pad_xy,
    discover_subjects,
    prepare_brain_mri,
    select_slices,
)
from tests.helpers import REPO_ROOT

# MNI-like LAS affine with anisotropic spacing so that spacing and position checks mean something
AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, 1.2, 0, -126.0], [0, 0, 2.5, -72.0], [0, 0, 0, 1]])


def _brain(shape, seed, z_centre=None):
    """Synthetic brain-extracted volume (X, Y, Z): noisy ellipsoid with a brighter core on a zero background."""
    rng = np.random.default_rng(seed)
    grid = list(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    if z_centre is not None:
        grid[2] = grid[2] - z_centre
    r = np.sqrt((grid[0] / 0.8) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.9) ** 2)
    vol = np.where(r < 1, 300 + 400 * (1 - r) + rng.normal(0, 10, shape), 0.0)
    return vol.astype(np.float32)


def _save(path: Path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_sform(affine, code=4)
    img.set_qform(affine, code=4)
    nib.save(img, path)
    return path


def _ukbb(root: Path, subjects, shape=(182, 218, 30), flair=True, flair_shape=None):
    for i, s in enumerate(subjects):
        _save(root / s / "T1" / "T1_brain_to_MNI.nii.gz", _brain(shape, i))
        if flair:
            _save(root / s / "T2_FLAIR" / "T2_FLAIR_brain_to_MNI.nii.gz", 2 * _brain(flair_shape or shape, 100 + i))
    return root


@pytest.fixture(scope="module")
def ukbb(tmp_path_factory):
    """3 subjects, 182x218x30 T1w + FLAIR, UK Biobank layout."""
    return _ukbb(tmp_path_factory.mktemp("ukbb"), ["1000001_20252_2_0", "1000002_20252_2_0", "1000003_20252_2_0"])


@pytest.fixture(scope="module")
def prepared(ukbb, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "slices"
    result = prepare_brain_mri(
        ukbb, out, with_flair=True, val_fraction=0.34, test_fraction=0.34, seed=0, progress=False
    )
    return out, result


def test_outputs_shapes_range_and_datalist(ukbb, prepared):
    out, result = prepared
    datalist = json.loads((out / "datalist.json").read_text())
    assert set(datalist) >= {"description", "training", "validation", "test"}
    subjects = {split: {e["subject"] for e in datalist[split]} for split in ("training", "validation", "test")}
    assert all(len(v) == 1 for v in subjects.values())  # 3 subjects, one per split
    assert set.union(*subjects.values()) == {p.name for p in ukbb.iterdir()}
    assert {k: sorted(v) for k, v in subjects.items()} == result.splits
    entries = [e for split in ("training", "validation", "test") for e in datalist[split]]
    assert len(entries) == 15 == result.num_slices_written
    assert len(list((out / "images").iterdir())) == 30  # T1w + FLAIR
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    for e in entries:
        assert set(e) == {"image", "flair", "caption", "subject", "slice_index", "slice_z_mm"}
        assert e["caption"] == DEFAULT_CAPTION
        assert e["image"] == f"images/{e['subject']}_slice-{e['slice_index']}_T1w.nii.gz"
        assert e["flair"] == f"images/{e['subject']}_slice-{e['slice_index']}_FLAIR.nii.gz"
        assert e["slice_z_mm"] == pytest.approx(-72.0 + 2.5 * e["slice_index"])
    for subject in subjects["training"]:
        assert sorted(e["slice_index"] for e in entries if e["subject"] == subject) == [13, 14, 15, 16, 17]
    for key in ("image", "flair"):
        for e in entries[:5]:
            img = nib.load(out / e[key])
            data = img.get_fdata()
            assert img.shape == (160, 224) and img.get_data_dtype() == np.float32
            assert data.min() >= 0 and data.max() <= 1 and data.max() > 0.5


def test_slice_content_and_affine(ukbb, prepared):
    out, _ = prepared
    subject = "1000002_20252_2_0"
    vol = nib.load(ukbb / subject / "T1" / "T1_brain_to_MNI.nii.gz").get_fdata()
    norm = (vol - vol.min()) / (vol.max() - vol.min())
    expected = np.zeros((160, 224))
    expected[:, 3:221] = norm[11:171, :, 14]  # crop x 182 -> 160 (offset 11), pad y 218 -> 224 (3 each side)
    img = nib.load(out / "images" / f"{subject}_slice-14_T1w.nii.gz")
    np.testing.assert_allclose(img.get_fdata(), expected, atol=1e-6)
    assert img.header.get_zooms() == pytest.approx((1.0, 1.2))
    assert img.header["pixdim"][3] == pytest.approx(2.5)  # slice thickness kept
    expected_affine = AFFINE.copy()
    expected_affine[:3, 3] = AFFINE[:3, :3] @ [11, -3, 14] + AFFINE[:3, 3]
    np.testing.assert_allclose(img.affine, expected_affine, atol=1e-4)
    assert int(img.header["sform_code"]) == 4


def test_monai_loads_datalist(prepared):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    out, _ = prepared
    for split in ("training", "validation", "test"):
        items = load_decathlon_datalist(out / "datalist.json", data_list_key=split, base_dir=out)
        assert len(items) == 5 and Path(items[0]["image"]).is_file()
    items = load_decathlon_datalist(out / "datalist.json", data_list_key="training", base_dir=out)
    sample = LoadImaged(keys=["image", "flair"], ensure_channel_first=True)(items[0])
    assert tuple(sample["image"].shape) == (1, 160, 224)
    assert tuple(sample["flair"].shape) == (1, 160, 224)
    assert tuple(float(p) for p in sample["image"].pixdim) == pytest.approx((1.0, 1.2))
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1


def test_select_slices_and_crop_helpers():
    vol = np.zeros((4, 4, 30), np.float32)
    assert select_slices(vol, 5, 1) == [13, 14, 15, 16, 17]
    assert select_slices(vol, 3, 4) == [11, 15, 19]
    assert select_slices(vol, 4, 1) == [13, 14, 15, 16]
    vol[:, :, 2:5] = 1.0  # all mass near the bottom: centre 3, moved up so that 5 slices fit
    assert select_slices(vol, 3, 1, center="mass") == [2, 3, 4]
    assert select_slices(vol, 5, 1, center="mass") == [1, 2, 3, 4, 5]
    with pytest.raises(DataPreparationError, match="do not fit"):
        select_slices(vol, 16, 2)
    arr = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    out = crop_or_pad_xy(arr, (3, 5))
    np.testing.assert_array_equal(out[:, 1:4], arr[1:4])
    assert out[:, 0].sum() == 0 and out[:, 4].sum() == 0


def test_mass_centre_on_volume(tmp_path):
    root = tmp_path / "in"
    _save(root / "s1" / "T1" / "T1_brain_to_MNI.nii.gz", _brain((40, 40, 40), 0, z_centre=-0.5))
    out = tmp_path / "out"
    prepare_brain_mri(root, out, num_slices=3, slice_center="mass", val_fraction=0, test_fraction=0, progress=False)
    indices = [e["slice_index"] for e in json.loads((out / "datalist.json").read_text())["training"]]
    assert indices[1] < 15  # brain centred in the lower half, not at z = 20
    assert "flair" not in json.loads((out / "datalist.json").read_text())["training"][0]


def test_missing_flair_is_skipped_or_strict_error(tmp_path):
    root = _ukbb(tmp_path / "in", ["a", "b", "c"], shape=(30, 30, 10))
    (root / "b" / "T2_FLAIR" / "T2_FLAIR_brain_to_MNI.nii.gz").unlink()
    out = tmp_path / "out"
    result = prepare_brain_mri(root, out, with_flair=True, val_fraction=0, test_fraction=0, progress=False)
    assert result.splits["training"] == ["a", "c"]
    assert len(result.skipped) == 1 and "'b'" in result.skipped[0]
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["preparation"]["skipped"] == result.skipped
    assert all(Path(out, e["flair"]).is_file() for e in datalist["training"])
    with pytest.raises(DataPreparationError, match="no FLAIR.*: b"):
        prepare_brain_mri(root, tmp_path / "strict", with_flair=True, strict=True, progress=False)
    assert not (tmp_path / "strict").exists()


def test_flair_shape_mismatch_names_subject(tmp_path):
    root = _ukbb(tmp_path / "in", ["good"], shape=(30, 30, 10))
    _ukbb(root, ["bad"], shape=(30, 30, 10), flair_shape=(30, 32, 10))
    with pytest.raises(DataPreparationError, match=r"subject 'bad': T1w shape \(30, 30, 10\).*FLAIR shape \(30, 32"):
        prepare_brain_mri(root, tmp_path / "out", with_flair=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_input_errors(tmp_path):
    with pytest.raises(DataPreparationError, match="input directory not found"):
        prepare_brain_mri(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPreparationError, match=r"no T1w volume matches the pattern '\*/T1/T1_brain_to_MNI.nii.gz'"):
        prepare_brain_mri(tmp_path / "empty", tmp_path / "out", progress=False)
    root = tmp_path / "in4d"
    _save(root / "s" / "T1" / "T1_brain_to_MNI.nii.gz", np.zeros((10, 10, 10, 2)))
    with pytest.raises(DataPreparationError, match=r"not 3D.*shape \(10, 10, 10, 2\)"):
        prepare_brain_mri(root, tmp_path / "out", progress=False)
    with pytest.raises(DataPreparationError, match="num_slices"):
        prepare_brain_mri(root, tmp_path / "out", num_slices=0, progress=False)
    with pytest.raises(DataPreparationError, match="slice_center"):
        prepare_brain_mri(root, tmp_path / "out", slice_center="top", progress=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_volume_leaves_nothing(tmp_path):
    root = _ukbb(tmp_path / "in", ["a", "b"], shape=(20, 20, 8), flair=False)
    vol = _brain((20, 20, 8), 1)
    vol[3, 4, 5] = np.nan
    _save(root / "b" / "T1" / "T1_brain_to_MNI.nii.gz", vol)
    with pytest.raises(DataPreparationError, match=r"b/T1/T1_brain_to_MNI.nii.gz has 1 non-finite"):
        prepare_brain_mri(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # subject 'a' was processed, then removed with the run


def test_output_dir_not_empty_and_overwrite(tmp_path):
    root = _ukbb(tmp_path / "in", ["a", "b"], shape=(20, 20, 8), flair=False)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale_T1w.nii.gz").write_text("old")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataPreparationError, match="not empty.*--overwrite"):
        prepare_brain_mri(root, out, progress=False)
    assert (out / "images" / "stale_T1w.nii.gz").exists()
    prepare_brain_mri(root, out, overwrite=True, num_slices=2, progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "a_slice-3_T1w.nii.gz",
        "a_slice-4_T1w.nii.gz",
        "b_slice-3_T1w.nii.gz",
        "b_slice-4_T1w.nii.gz",
    ]
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json", "images", "notes.txt"]


def test_flat_layout_patterns_and_reorientation(tmp_path):
    root = tmp_path / "flat"
    # stored with the inferior-superior axis first: axial slices need reorientation
    sagittal_first = np.array([[0, 0, 2.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    for s in ("sub01", "sub02"):
        _save(root / f"{s}_T1w.nii.gz", _brain((12, 30, 40), 0), sagittal_first)
        _save(root / f"{s}_FLAIR.nii.gz", _brain((12, 30, 40), 1), sagittal_first)
    subjects, skipped = discover_subjects(root, "*_T1w.nii.gz", "*_FLAIR.nii.gz")
    assert [s.subject for s in subjects] == ["sub01", "sub02"] and not skipped
    kwargs = dict(t1_pattern="*_T1w.nii.gz", flair_pattern="*_FLAIR.nii.gz", with_flair=True, progress=False)
    with pytest.raises(DataPreparationError, match="not the inferior-superior axis.*axcodes"):
        prepare_brain_mri(root, tmp_path / "out", **kwargs)
    out = tmp_path / "out"
    prepare_brain_mri(root, out, axcodes="RAS", target_shape=(32, 24), num_slices=1, **kwargs)
    entry = json.loads((out / "datalist.json").read_text())["training"][0]
    img = nib.load(out / entry["image"])
    # RAS: (x, y, z) = (40, 30, 12) voxels of (2.0, 1.0, 1.0) mm; one slice at z = 12 // 2
    assert img.shape == (32, 24) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.header.get_zooms() == pytest.approx((2.0, 1.0)) and img.header["pixdim"][3] == pytest.approx(1.0)
    assert entry["slice_index"] == 6 and entry["slice_z_mm"] == pytest.approx(6.0)
    canonical = nib.as_closest_canonical(nib.load(root / f"{entry['subject']}_T1w.nii.gz")).get_fdata()
    norm = (canonical - canonical.min()) / (canonical.max() - canonical.min())
    np.testing.assert_allclose(img.get_fdata(), norm[4:36, 3:27, 6], atol=1e-6)


def test_cli(tmp_path):
    root = _ukbb(tmp_path / "in", ["a", "b", "c"], shape=(20, 20, 8))
    tool = [sys.executable, str(REPO_ROOT / "tools" / "prepare_brain_mri.py")]
    out = tmp_path / "out"
    args = ["--input_dir", str(root), "--output_dir", str(out), "--with_flair", "--num_slices", "3", "--seed", "1"]
    res = subprocess.run([*tool, *args, "--progress=False"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "wrote 9 slices of 3 subjects" in res.stdout
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["preparation"]["seed"] == 1 and len(datalist["training"][0]) == 6
    res = subprocess.run([*tool, *args], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "error: output directory" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([*tool, "--input_dir", str(tmp_path / "nope"), "--output_dir", str(out)], capture_output=True)
    assert res.returncode == 2 and b"input directory not found" in res.stderr


def test_spacing_resamples_to_the_target_voxel_size_keeping_the_axes(tmp_path):
    """1 x 1.2 x 2.5 mm volumes prepared for a 2 mm model: 2 mm slices, LAS kept, the brain at the same place."""
    root = _ukbb(tmp_path / "in", ["s1", "s2", "s3"], shape=(80, 90, 20), flair=True)
    out = tmp_path / "out"
    prepare_brain_mri(root, out, with_flair=True, spacing=2, target_shape=(40, 54), num_slices=3, progress=False)
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["preparation"]["spacing_mm"] == [2.0, 2.0, 2.0]
    entry = datalist["training"][0]
    image = nib.load(out / entry["image"])
    assert image.shape == (40, 54)
    assert np.allclose(image.header.get_zooms()[:2], (2.0, 2.0))
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    assert nib.load(out / entry["flair"]).shape == (40, 54)
    # the brain fills about the same fraction of the field of view as at full resolution (80 mm -> 40 voxels)
    assert 0.5 < (np.asarray(image.dataobj) > 0).mean() < 0.8


@pytest.mark.parametrize("spacing", [0, -1, [1, 2], True, float("nan")])
def test_bad_spacing_is_refused_before_work(tmp_path, spacing):
    root = _ukbb(tmp_path / "in", ["s1", "s2", "s3"], shape=(20, 20, 12), flair=False)
    with pytest.raises(DataPreparationError, match="spacing must be"):
        prepare_brain_mri(root, tmp_path / "out", spacing=spacing, progress=False)
    assert not (tmp_path / "out").exists()
