"""common.data.brain.phantoms and make-brain-phantoms: synthetic brain MRI with known truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.brain.phantoms import (
    VENTRICLE_LARGE_MIN_ML,
    VENTRICLE_SMALL_MAX_ML,
    BrainPhantomGenerator,
    PhantomGeometry,
    build_caption,
    ventricle_size_word,
    write_phantom_dataset,
)
from tests.helpers import REPO_ROOT
from tools import make_brain_phantoms


@pytest.fixture(scope="module")
def demo() -> BrainPhantomGenerator:
    return BrainPhantomGenerator(PhantomGeometry.demo(), seed=0)


@pytest.fixture(scope="module")
def subjects(demo):
    return [demo.subject(i) for i in range(3)]


def test_geometry():
    d, f = PhantomGeometry.demo(), PhantomGeometry.full()
    assert (d.spacing_mm, d.slice_shape, d.num_slices) == (2.0, (80, 112), 5)
    assert (f.spacing_mm, f.slice_shape, f.num_slices) == (1.0, (160, 224), 5)
    np.testing.assert_allclose(d.slice_z_mm, [11, 13, 15, 17, 19])
    np.testing.assert_allclose(PhantomGeometry.full(num_slices=3, slice_step=2).slice_z_mm, [13, 15, 17])
    affine = d.slice_affine(4)
    x, y = d.in_plane_mm()
    np.testing.assert_allclose(np.diag(affine), [2, 2, 2, 1])
    np.testing.assert_allclose(affine[:3, 3], [x[0], y[0], 19])
    assert x[-1] - x[0] == pytest.approx(158) and np.mean(x) == pytest.approx(0)
    with pytest.raises(ValueError):
        PhantomGeometry(spacing_mm=0, slice_shape=(80, 112))
    with pytest.raises(ValueError):
        PhantomGeometry.demo(num_slices=0)


def test_shapes_and_range(subjects):
    s = subjects[0]
    assert s.subject_id == "sub-0000"
    for image in (s.t1, s.flair):
        assert image.shape == (5, 80, 112) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert image.max() == pytest.approx(1.0)
        assert np.all(image[~s.brain_mask] == 0)  # skull-stripped background
        assert 0.2 < s.brain_mask.mean() < 0.8
    assert s.affines.shape == (5, 4, 4)
    assert len(s.captions) == len(s.slice_facts) == 5
    for k, sf in enumerate(s.slice_facts):
        assert sf["slice_index"] == k
        assert sf["gm_fraction"] + sf["wm_fraction"] + sf["csf_fraction"] == pytest.approx(1.0, abs=1e-3)
        assert all(0 < sf[f"{t}_fraction"] < 1 for t in ("gm", "wm", "csf"))
    assert [sf["slice_z_mm"] for sf in s.slice_facts] == pytest.approx(list(s.affines[:, 2, 3]))
    assert 45 <= s.facts["age"] <= 85 and s.facts["ventricle_volume_ml"] > 5 and s.facts["wmh_volume_ml"] >= 0


def test_determinism(subjects):
    again = BrainPhantomGenerator(PhantomGeometry.demo(), seed=0).subject(1)
    np.testing.assert_array_equal(again.t1, subjects[1].t1)
    np.testing.assert_array_equal(again.flair, subjects[1].flair)
    assert again.facts == subjects[1].facts and again.captions == subjects[1].captions
    other_seed = BrainPhantomGenerator(PhantomGeometry.demo(), seed=1).subject(1)
    assert not np.allclose(other_seed.t1, subjects[1].t1)
    assert other_seed.facts["age"] != subjects[1].facts["age"]
    assert not np.allclose(subjects[0].t1, subjects[1].t1)


def test_contrast_ordering(subjects):
    for s in subjects:
        tissue = s.tissue
        wm = (tissue["wm"] > 0.9) & s.brain_mask
        gm = (tissue["gm"] > 0.7) & s.brain_mask
        csf = (tissue["csf"] > 0.9) & s.brain_mask
        assert wm.sum() > 100 and gm.sum() > 30 and csf.sum() > 30
        t1 = {k: s.t1[m].mean() for k, m in (("wm", wm), ("gm", gm), ("csf", csf))}
        flair = {k: s.flair[m].mean() for k, m in (("wm", wm), ("gm", gm), ("csf", csf))}
        assert t1["wm"] > t1["gm"] + 0.1 > t1["csf"] + 0.2, t1
        assert flair["gm"] > flair["wm"] + 0.05 and flair["wm"] > flair["csf"] + 0.2, flair
        assert t1["csf"] < 0.3 and flair["csf"] < 0.3


def test_older_means_larger_ventricles(demo):
    ages = [50.0, 60.0, 70.0, 80.0]
    older = [demo.subject(2, age=a) for a in ages]
    volumes = [s.facts["ventricle_volume_ml"] for s in older]
    assert all(b > a for a, b in zip(volumes, volumes[1:], strict=False)), volumes
    assert [s.facts["age"] for s in older] == ages
    wmh = [s.facts["wmh_volume_ml"] for s in older]
    assert all(b >= a for a, b in zip(wmh, wmh[1:], strict=False)) and wmh[-1] > 0, wmh
    csf = [s.tissue["csf"].sum() for s in older]  # ventricles and sulci grow in the rendered slices too
    assert all(b > a for a, b in zip(csf, csf[1:], strict=False)), csf
    # only the age changed: same deformation and contrast draws (the T1w contrast follows age, the rest does not)
    p50, p80 = (demo.parameters(2, age=a) for a in (50.0, 80.0))
    np.testing.assert_array_equal(p50.displacement_ctrl, p80.displacement_ctrl)
    np.testing.assert_array_equal(p50.bias_coefficients, p80.bias_coefficients)
    assert p50.flair_intensity == p80.flair_intensity
    assert p50.t1_intensity["wm"] == p80.t1_intensity["wm"] and p50.t1_intensity["csf"] == p80.t1_intensity["csf"]


def test_captions():
    assert ventricle_size_word(VENTRICLE_SMALL_MAX_ML - 0.1) == "small"
    assert ventricle_size_word(VENTRICLE_SMALL_MAX_ML) == "medium"
    assert ventricle_size_word(VENTRICLE_LARGE_MIN_ML) == "large"
    assert build_caption(71.6, VENTRICLE_LARGE_MIN_ML + 5) == (
        "T1-weighted image of a brain of a 72 year old subject with large ventricles."
    )
    assert build_caption(50, 10, contrast="FLAIR").startswith("FLAIR image of a brain of a 50 year old")


def test_dataset_split_and_monai_loading(tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    geometry = PhantomGeometry.demo(num_slices=2)
    path = write_phantom_dataset(tmp_path, num_subjects=6, geometry=geometry, seed=3, progress=False)
    assert path == tmp_path / "datalist.json"
    data = json.loads(path.read_text())
    assert data["seed"] == 3 and data["geometry"]["slice_shape"] == [80, 112]
    subjects = {k: {e["subject"] for e in data[k]} for k in ("training", "validation", "test")}
    assert all(subjects.values())
    assert not (subjects["training"] & subjects["validation"] or subjects["training"] & subjects["test"])
    assert not subjects["validation"] & subjects["test"]
    assert set().union(*subjects.values()) == {f"sub-{i:04d}" for i in range(6)}
    assert sum(len(data[k]) for k in subjects) == 12
    entry = data["training"][0]
    assert set(entry) >= {"image", "flair", "caption", "subject", "age", "ventricle_volume_ml", "gm_fraction"}
    assert set(entry) >= {"wm_fraction", "csf_fraction", "wmh_volume_ml", "slice_index", "slice_z_mm"}
    assert entry["image"].startswith("images/") and entry["image"].endswith("_T1w.nii.gz")
    assert entry["flair"] == entry["image"].replace("_T1w", "_FLAIR")

    items = load_decathlon_datalist(str(path), data_list_key="training", base_dir=str(tmp_path))
    loaded = LoadImaged(keys=["image", "flair"], ensure_channel_first=True)(items[0])
    assert tuple(loaded["image"].shape) == (1, 80, 112) and tuple(loaded["flair"].shape) == (1, 80, 112)
    np.testing.assert_allclose(loaded["image"].affine.numpy()[:3, 3][2], entry["slice_z_mm"])
    np.testing.assert_allclose(loaded["image"].pixdim.numpy()[:2], [2.0, 2.0])
    assert 0.0 <= float(loaded["image"].min()) and float(loaded["flair"].max()) <= 1.0

    # same seed, same split; rewriting with fewer subjects leaves no stale images behind
    path = write_phantom_dataset(
        tmp_path, num_subjects=3, geometry=PhantomGeometry.demo(num_slices=1), seed=3, progress=False
    )
    assert len(list((tmp_path / "images").glob("*.nii.gz"))) == 3 * 2
    assert {e["subject"] for e in json.loads(path.read_text())["test"]}
    with pytest.raises(ValueError, match="leave none for validation"):
        write_phantom_dataset(tmp_path / "x", num_subjects=2, geometry=geometry, progress=False)


def test_extra_training_subjects_keep_the_validation_and_test_splits(tmp_path):
    """A larger training set is compared with the smaller one's models on the same test images."""
    geometry = PhantomGeometry.demo(num_slices=1)
    base = json.loads(write_phantom_dataset(tmp_path / "a", 6, geometry, seed=3, progress=False).read_text())
    more = json.loads(
        write_phantom_dataset(
            tmp_path / "b", 6, geometry, seed=3, progress=False, extra_training_subjects=2
        ).read_text()
    )
    assert more["validation"] == base["validation"] and more["test"] == base["test"]
    assert more["subjects"]["training"] == base["subjects"]["training"] + ["sub-0006", "sub-0007"]
    assert more["training"][: len(base["training"])] == base["training"]
    assert more["num_subjects"] == 6 and more["extra_training_subjects"] == 2
    same = base["test"][0]["image"]
    assert (tmp_path / "a" / same).read_bytes() == (tmp_path / "b" / same).read_bytes()
    with pytest.raises(ValueError, match="extra_training_subjects must be an integer >= 0"):
        write_phantom_dataset(tmp_path / "c", 6, geometry, progress=False, extra_training_subjects=-1)
    with pytest.raises(ValueError, match="extra_training_subjects"):
        make_brain_phantoms.make_brain_phantoms(
            output_dir=str(tmp_path / "d"), num_subjects=3, extra_training_subjects=1.5
        )
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_cli_errors(tmp_path):
    tool = make_brain_phantoms
    with pytest.raises(ValueError, match="unknown size"):
        tool.make_brain_phantoms(output_dir=str(tmp_path / "a"), num_subjects=3, size="huge")
    with pytest.raises(ValueError, match="num_subjects"):
        tool.make_brain_phantoms(output_dir=str(tmp_path / "a"), num_subjects=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        tool.make_brain_phantoms(output_dir=str(tmp_path / "full"), num_subjects=3)
    assert not (tmp_path / "a").exists()

    # the script itself, run from the repository root: a clear message and exit status 2
    result = subprocess.run(
        [sys.executable, "tools/make_brain_phantoms.py", "--output_dir", str(tmp_path / "b"), "--size", "huge"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "make_brain_phantoms: error: unknown size 'huge'" in result.stderr


def test_cli_writes_dataset(tmp_path, capsys):
    tool = make_brain_phantoms
    out = tmp_path / "phantoms"
    datalist = tool.make_brain_phantoms(output_dir=str(out), num_subjects=3, num_slices=1, seed=1, progress=False)
    assert Path(datalist).is_file() and len(list((out / "images").iterdir())) == 6
    assert "wrote 3 slices" in capsys.readouterr().out
    tool.make_brain_phantoms(output_dir=str(out), num_subjects=3, num_slices=1, seed=1, overwrite=True, progress=False)


def test_resample_t1_keeps_anatomy_and_redraws_contrast():
    from common.data.brain.phantoms import BrainPhantomGenerator

    generator = BrainPhantomGenerator(PhantomGeometry.demo(num_slices=1), seed=0)
    subject = generator.subject(3)
    real = subject.t1
    redrawn = generator.resample_t1(3, seed=1)
    assert redrawn.shape == real.shape and not np.array_equal(redrawn, real)
    assert np.array_equal(redrawn, generator.resample_t1(3, seed=1)), "deterministic for a seed"
    assert not redrawn[~subject.brain_mask].any(), "same brain mask: the anatomy is the subject's"
    assert np.corrcoef(redrawn.ravel(), real.ravel())[0, 1] > 0.9


def test_translation_ceiling_tool(tmp_path):
    from tools.phantom_translation_ceiling import phantom_translation_ceiling

    write_phantom_dataset(tmp_path, num_subjects=6, geometry=PhantomGeometry.demo(num_slices=1), seed=0, progress=False)
    result = phantom_translation_ceiling(str(tmp_path), split="training", output=str(tmp_path / "ceiling.json"))
    assert result["num_slices"] >= 1 and json.loads((tmp_path / "ceiling.json").read_text()) == result
    m = result["metrics"]
    assert 10 < m["psnr"]["mean"] < 60 and 0 < m["mae"]["mean"] < 0.5 and 0.5 < m["ms_ssim"]["mean"] < 1


def test_intensity_models_keep_anatomy_and_set_bias_and_contrast():
    from common.metrics.paired import PairedImageMetrics

    geometry = PhantomGeometry.demo(num_slices=1)
    ukb = BrainPhantomGenerator(geometry, seed=0)
    raw = BrainPhantomGenerator(geometry, seed=0, intensity="uncorrected")
    assert ukb.intensity.name == "ukbiobank", "UK Biobank-like preprocessing is the default"
    a, b = ukb.subject(2), raw.subject(2)
    assert a.captions == b.captions and a.facts == b.facts
    for key in a.tissue:
        np.testing.assert_array_equal(a.tissue[key], b.tissue[key])
    assert not np.array_equal(a.t1, b.t1)
    assert np.abs(ukb.parameters(2).bias_coefficients).max() < np.abs(raw.parameters(2).bias_coefficients).max()

    # grey-white contrast fades with age: same random draws, older age, higher GM/WM ratio
    young, old = ukb.parameters(2, age=50).t1_intensity, ukb.parameters(2, age=80).t1_intensity
    assert young["gm"] / young["wm"] < old["gm"] / old["wm"]
    ratios = [ukb.parameters(i, age=65).t1_intensity for i in range(20)]
    assert np.std([r["gm"] / r["wm"] for r in ratios]) < 0.03, "small contrast spread between subjects"

    # a corrected image leaves less of the T1w undetermined by the anatomy: higher translation ceiling
    metric = PairedImageMetrics((80, 112))

    def ceiling(generator):
        real = np.concatenate([generator.subject(i).t1 for i in range(4)])[:, None]
        redrawn = np.concatenate([generator.resample_t1(i, seed=1) for i in range(4)])[:, None]
        return float(metric(torch.from_numpy(redrawn), torch.from_numpy(real))["psnr"].mean())

    assert ceiling(ukb) > ceiling(raw) + 1.5

    with pytest.raises(ValueError, match="unknown intensity model 'ukb'.*ukbiobank, uncorrected"):
        BrainPhantomGenerator(geometry, intensity="ukb")


def test_intensity_model_is_recorded_and_read_by_the_ceiling(tmp_path):
    from tools.phantom_translation_ceiling import phantom_translation_ceiling

    geometry = PhantomGeometry.demo(num_slices=1)
    with pytest.raises(ValueError, match="unknown intensity model"):
        make_brain_phantoms.make_brain_phantoms(output_dir=str(tmp_path / "bad"), num_subjects=3, intensity="x")
    assert not (tmp_path / "bad").exists()
    path = write_phantom_dataset(tmp_path, 6, geometry, seed=0, progress=False, intensity="uncorrected")
    data = json.loads(path.read_text())
    assert data["intensity_model"] == "uncorrected"
    result = phantom_translation_ceiling(str(tmp_path), split="training")
    assert result["intensity_model"] == "uncorrected"
    # data sets written before the models had names have no key: they were uncorrected
    del data["intensity_model"]
    path.write_text(json.dumps(data))
    assert phantom_translation_ceiling(str(tmp_path), split="training") == result
