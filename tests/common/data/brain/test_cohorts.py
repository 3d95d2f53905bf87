"""common.data.brain.cohorts: IXI, OASIS-1 and HCP trees the tests write, on a small MNI-like grid (24 x 28 x 20 mm)."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.data.brain.cohorts import (
    TEMPLATES,
    Demographics,
    find_volumes,
    grid_problems,
    prepare_brain_cohort,
    read_demographics,
)
from common.data.brain.mri_preparation import DEFAULT_CAPTION, DataPreparationError, VolumeHeader, prepare_brain_mri

GRID = (24, 28, 20)  # the template grid of the tests: 1 mm voxels, LAS
AFFINE = np.array([[-1.0, 0, 0, 12.0], [0, 1.0, 0, -16.0], [0, 0, 1.0, -8.0], [0, 0, 0, 1]])  # LAS, like MNI152
SMALL = {"grid_shape": GRID, "target_shape": (20, 24), "num_slices": 3, "progress": False}
THIRDS = {"val_fraction": 0.34, "test_fraction": 0.34}  # 3 subjects: one per split
OASIS_HEADER = ["ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF", "Delay"]
IXI_HEADER = ["IXI_ID", "SEX_ID (1=m, 2=f)", "HEIGHT", "WEIGHT", "AGE"]
IXI_ROWS = [[2, 2, 164, 58, 35.8], [2, 0, 0, 0, None], [12, 1, 175, 70, 38.78], [13, 1, 182, 70, None]]


def brain(shape=GRID, seed=0) -> np.ndarray:
    """Volume (X, Y, Z): noisy ellipsoid, brighter at its core, on a zero background."""
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum((a / w) ** 2 for a, w in zip(axes, (0.8, 0.85, 0.9), strict=True)))
    noise = np.random.default_rng(seed).normal(0, 10, shape)
    return np.where(r < 1, 300 + 400 * (1 - r) + noise, 0.0).astype(np.float32)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def write_xls(path: Path, rows: list[list]) -> Path:
    """A minimal Excel 2.x worksheet (BIFF2 records, no OLE container), which xlrd reads like any .xls."""

    def record(opcode: int, data: bytes) -> bytes:
        return struct.pack("<HH", opcode, len(data)) + data

    out = [record(0x0009, struct.pack("<HH", 0x0002, 0x0010))]  # BOF of a worksheet
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            cell = struct.pack("<HH3s", r, c, b"\0\0\0")
            if isinstance(value, str):
                text = value.encode("latin-1")
                out.append(record(0x0004, cell + struct.pack("<B", len(text)) + text))  # LABEL
            elif value is not None:
                out.append(record(0x0003, cell + struct.pack("<d", float(value))))  # NUMBER
    out.append(record(0x000A, b""))  # EOF
    path.write_bytes(b"".join(out))
    return path


def make_ixi(root: Path) -> tuple[Path, Path]:
    """Registered IXI volumes (one without demographics) and a CSV export of IXI.xls with a zeroed duplicate row."""
    for i, name in enumerate(["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-IOP-0870", "IXI014-HH-1236"]):
        save_nifti(root / "ixi" / f"{name}_T1_mni_brain.nii.gz", brain(seed=i))
    return root / "ixi", write_csv(root / "IXI.csv", IXI_HEADER, IXI_ROWS)


def make_oasis(root: Path) -> tuple[Path, Path]:
    """OASIS-1 disc: Analyze T88 volumes of 5 sessions (one a rescan, one with 3 averaged scans) and the CSV."""
    disc = root / "disc1"
    for i, (session, averaged) in enumerate(
        [("OAS1_0001_MR1", 4), ("OAS1_0002_MR1", 4), ("OAS1_0002_MR2", 4), ("OAS1_0003_MR1", 4), ("OAS1_0004_MR1", 3)]
    ):
        folder = disc / session / "PROCESSED" / "MPRAGE" / "T88_111"
        folder.mkdir(parents=True)
        image = nib.AnalyzeImage(brain(seed=i)[..., None], np.diag([-1.0, 1.0, 1.0, 1.0]))  # (X, Y, Z, 1) as OASIS
        nib.save(image, folder / f"{session}_mpr_n{averaged}_anon_111_t88_masked_gfc.img")
    rows = [
        ["OAS1_0001_MR1", "F", "R", 74, 2, 3, 29, 0, 1344, 0.743, 1.306, "N/A"],
        ["OAS1_0002_MR1", "M", "R", 25, None, None, None, None, 1588, 0.803, 1.105, "N/A"],
        ["OAS1_0002_MR2", "M", "R", 25, None, None, None, None, 1590, 0.801, 1.104, 21],
        ["OAS1_0003_MR1", "F", "R", 73, 4, 3, 27, 0.5, 1454, 0.708, 1.207, "N/A"],
        ["OAS1_0004_MR1", "M", "R", 81, 5, 1, 30, 0, 1699, 0.701, 1.033, "N/A"],
    ]
    return disc, write_csv(root / "oasis_cross-sectional.csv", OASIS_HEADER, rows)


def make_hcp(root: Path) -> tuple[Path, Path]:
    """HCP subject folders with MNINonLinear/T1w_restore_brain.nii.gz and the unrestricted CSV."""
    rows = [["100307", "F", "26-30"], ["100408", "M", "31-35"], ["101107", "M", "22-25"], ["101309", "M", "36+"]]
    for i, (subject, *_) in enumerate(rows):
        save_nifti(root / "hcp" / subject / "MNINonLinear" / "T1w_restore_brain.nii.gz", brain(seed=i))
    rows = [[s, "S1200", "Q01", sex, age] for s, sex, age in rows]
    return root / "hcp", write_csv(
        root / "unrestricted_me.csv", ["Subject", "Release", "Acquisition", "Gender", "Age"], rows
    )


def entries_of(out: Path) -> tuple[dict, list[dict]]:
    datalist = json.loads((out / "datalist.json").read_text())
    return datalist, [e for split in ("training", "validation", "test") for e in datalist[split]]


def test_ixi_registered_volumes_with_csv_demographics(tmp_path):
    input_dir, table = make_ixi(tmp_path)
    out = tmp_path / "out"
    result = prepare_brain_cohort(
        "ixi", input_dir, table, out, t1_pattern="{subject}_T1_mni_brain.nii.gz", **SMALL, **THIRDS
    )
    datalist, entries = entries_of(out)
    assert {split: sorted({e["subject"] for e in datalist[split]}) for split in result.splits} == result.splits
    assert sorted(sum(result.splits.values(), [])) == ["IXI002", "IXI012", "IXI013"]
    assert all(len(ids) == 1 for ids in result.splits.values())
    assert result.excluded == {"repeat_session": 0, "no_demographics": 1, "not_healthy": 0}
    assert datalist["preparation"]["skipped"] == result.skipped and "IXI014 has no row" in result.skipped[0]
    assert len(entries) == 9 == result.num_slices_written == len(list((out / "images").iterdir()))
    facts = {e["subject"]: e["facts"] for e in entries}
    assert facts["IXI002"] | {"slice_index": 0, "slice_position_mm": 0} == {
        "cohort": "ixi",
        "subject": "IXI002",
        "age": 35.8,
        "age_range": None,
        "sex": "female",  # the zeroed duplicate row neither overrides nor contradicts
        "healthy": True,
        "site": "Guys",
        "space": "MNI152",
        "cdr": None,
        "mmse": None,
        "nwbv": None,
        "etiv_ml": None,
        "plane": "axial",
        "slice_index": 0,
        "slice_position_mm": 0,
    }
    assert (facts["IXI012"]["sex"], facts["IXI012"]["age"], facts["IXI012"]["site"]) == ("male", 38.78, "HH")
    assert facts["IXI013"]["age"] is None and facts["IXI013"]["site"] == "IOP"
    for e in entries:
        assert set(e) == {"image", "caption", "subject", "slice_index", "slice_z_mm", "facts"}
        assert (
            e["caption"] == DEFAULT_CAPTION
            and e["image"] == f"images/{e['subject']}_slice-{e['slice_index']}_T1w.nii.gz"
        )
        assert e["slice_index"] in (9, 10, 11) and e["facts"]["slice_index"] == e["slice_index"]
        assert e["facts"]["slice_position_mm"] == e["slice_z_mm"] == pytest.approx(-8.0 + e["slice_index"])
        img = nib.load(out / e["image"])
        assert img.shape == (20, 24) and 0 <= img.get_fdata().min() and img.get_fdata().max() <= 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_xls_demographics_read_like_their_csv_export(tmp_path):
    from_csv, _ = read_demographics("ixi", write_csv(tmp_path / "IXI.csv", IXI_HEADER, IXI_ROWS))
    from_xls, warnings = read_demographics("ixi", write_xls(tmp_path / "IXI.xls", [IXI_HEADER, *IXI_ROWS]))
    assert from_xls == from_csv and not warnings
    assert from_xls["IXI002"] == Demographics(age=35.8, sex="female")
    assert from_xls["IXI013"] == Demographics(age=None, sex="male")
    conflicting = [IXI_HEADER, [7, 1, 0, 0, 40.1], [7, 2, 0, 0, 40.1]]
    records, warnings = read_demographics("ixi", write_xls(tmp_path / "conflict.xls", conflicting))
    assert records["IXI007"] == Demographics(age=40.1, sex=None)
    assert warnings == ["IXI007: the demographics rows disagree on sex (male vs female); left unknown"]


def test_oasis_keeps_healthy_first_sessions_in_talairach_space(tmp_path):
    disc, table = make_oasis(tmp_path)
    out = tmp_path / "out"
    result = prepare_brain_cohort("oasis1", disc, table, out, **SMALL, **THIRDS)
    assert sorted(sum(result.splits.values(), [])) == ["OAS1_0001", "OAS1_0002", "OAS1_0004"]  # n3 found too
    assert result.excluded == {"repeat_session": 1, "no_demographics": 0, "not_healthy": 1}
    assert any("OAS1_0003_MR1 is not healthy (CDR 0.5)" in m for m in result.skipped)
    datalist, entries = entries_of(out)
    assert datalist["preparation"]["template"]["space"] == "Talairach-T88"
    facts = {e["subject"]: e["facts"] for e in entries}
    assert facts["OAS1_0001"]["space"] == "Talairach-T88"
    assert {k: facts["OAS1_0001"][k] for k in ("age", "sex", "cdr", "mmse", "nwbv", "etiv_ml")} == {
        "age": 74.0,
        "sex": "female",
        "cdr": 0.0,
        "mmse": 29.0,
        "nwbv": 0.743,
        "etiv_ml": 1344.0,
    }
    assert facts["OAS1_0002"]["cdr"] is None and facts["OAS1_0002"]["healthy"]  # blank CDR (under 60): healthy
    assert nib.load(out / entries[0]["image"]).shape == (20, 24)


def test_hcp_age_ranges_and_axial_slices_equal_prepare_brain_mri(tmp_path):
    input_dir, table = make_hcp(tmp_path)
    out, reference = tmp_path / "out", tmp_path / "reference"
    prepare_brain_cohort("hcp", input_dir, table, out, **SMALL)
    _, entries = entries_of(out)
    ages = {e["subject"]: (e["facts"]["age_range"], e["facts"]["age"]) for e in entries}
    assert ages == {
        "100307": ("26-30", 28.0),
        "100408": ("31-35", 33.0),
        "101107": ("22-25", 23.5),
        "101309": ("36+", 36.0),
    }
    prepare_brain_mri(
        input_dir,
        reference,
        t1_pattern="*/MNINonLinear/T1w_restore_brain.nii.gz",
        target_shape=(20, 24),
        num_slices=3,
        progress=False,
    )
    datalist, expected = (
        json.loads((out / "datalist.json").read_text()),
        json.loads((reference / "datalist.json").read_text()),
    )
    for split in ("training", "validation", "test"):
        keys = ("image", "subject", "slice_index", "slice_z_mm")
        assert [{k: e[k] for k in keys} for e in datalist[split]] == [{k: e[k] for k in keys} for e in expected[split]]
    for e in entries:
        ours, theirs = nib.load(out / e["image"]), nib.load(reference / e["image"])
        np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())
        np.testing.assert_allclose(ours.affine, theirs.affine)


def test_coronal_and_sagittal_planes(tmp_path):
    input_dir, table = make_hcp(tmp_path)
    out = tmp_path / "out"
    prepare_brain_cohort("hcp", input_dir, table, out, planes="axial,coronal,sagittal", **SMALL)
    _, entries = entries_of(out)
    assert len(entries) == 4 * 3 * 3
    coronal = next(e for e in entries if e["facts"]["plane"] == "coronal" and e["subject"] == "100307")
    assert coronal["image"] == f"images/100307_plane-coronal_slice-{coronal['slice_index']}_T1w.nii.gz"
    assert coronal["slice_index"] in (13, 14, 15)  # middle of y (28 voxels)
    assert coronal["facts"]["slice_position_mm"] == pytest.approx(-16.0 + coronal["slice_index"])  # y in mm
    img = nib.load(out / coronal["image"])
    volume = nib.load(input_dir / "100307" / "MNINonLinear" / "T1w_restore_brain.nii.gz").get_fdata()
    norm = (volume - volume.min()) / (volume.max() - volume.min())
    expected = np.zeros((20, 24))
    expected[:, 2:22] = norm[2:22, coronal["slice_index"], :]  # (x, z): crop x 24 -> 20, pad z 20 -> 24
    np.testing.assert_allclose(img.get_fdata(), expected, atol=1e-6)
    world = img.affine @ [0, 2, 0, 1]  # voxel (0, 2) of the slice is voxel (2, k, 0) of the volume
    np.testing.assert_allclose(world[:3], AFFINE[:3] @ [2, coronal["slice_index"], 0, 1])
    sagittal = next(e for e in entries if e["facts"]["plane"] == "sagittal")
    assert sagittal["slice_index"] in (11, 12, 13)  # middle of x (24 voxels)
    assert sagittal["facts"]["slice_position_mm"] == pytest.approx(12.0 - sagittal["slice_index"])  # x grows to L
    assert nib.load(out / sagittal["image"]).shape == (20, 24)


def test_volumes_off_the_template_grid_are_refused_before_writing(tmp_path):
    input_dir, table = make_ixi(tmp_path)
    c, s = np.cos(np.radians(5)), np.sin(np.radians(5))
    raw = np.eye(4)  # stored sagittal like a raw scan, and 5 degrees oblique
    raw[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[0.0, 0, 1.2], [0.94, 0, 0], [0, 0.94, 0]])
    raw_path = save_nifti(input_dir / "IXI012-HH-1211_T1_mni_brain.nii.gz", brain((30, 30, 16)), raw)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataPreparationError) as error:
        prepare_brain_cohort("ixi", input_dir, table, out, t1_pattern="{subject}_T1_mni_brain.nii.gz", **SMALL)
    message = str(error.value)
    assert str(raw_path) in message and "IXI002" not in message  # names the bad file only
    assert "oblique axes" in message and "field of view 19.2 x 28.2 x 28.2 mm, expected 24 x 28 x 20 mm" in message
    assert "antsRegistrationSyNQuick.sh -d 3 -f MNI152_T1_1mm_brain.nii.gz" in message
    assert "nothing was written" in message and list(out.iterdir()) == []


def test_grid_problems_of_hcp_and_oasis_grids():
    mni = TEMPLATES["mni152"]
    hcp = VolumeHeader(Path("T1w_restore_brain.nii.gz"), (260, 311, 260), np.diag([-0.7, 0.7, 0.7, 1.0]))
    assert grid_problems(hcp, mni) == ["voxels of 0.7 x 0.7 x 0.7 mm, expected 1 mm (resample with --spacing 1)"]
    assert grid_problems(hcp, mni, resampled=True) == []  # the 182 x 218 x 182 mm box at 0.7 mm
    oasis = VolumeHeader(Path("t88.img"), (176, 208, 176), np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert grid_problems(oasis, TEMPLATES["t88"]) == []
    assert grid_problems(oasis, mni) == ["field of view 176 x 208 x 176 mm, expected 182 x 218 x 182 mm"]
    ras = VolumeHeader(Path("ras.nii"), (182, 218, 182), np.diag([1.0, 1.0, 1.0, 1.0]))
    assert grid_problems(ras, mni) == ["orientation RAS, expected LAS"]


def test_missing_column_and_unhealthy_only_errors(tmp_path):
    input_dir, _ = make_ixi(tmp_path)
    no_age = write_csv(tmp_path / "no_age.csv", IXI_HEADER[:-1], [row[:-1] for row in IXI_ROWS])
    out = tmp_path / "out"
    with pytest.raises(DataPreparationError, match=r"no column 'AGE' \(columns found: 'IXI_ID', .*give IXI.xls"):
        prepare_brain_cohort("ixi", input_dir, no_age, out, t1_pattern="{subject}_T1_mni_brain.nii.gz", **SMALL)
    with pytest.raises(
        DataPreparationError, match=r"1 volume\(s\) have no row in the demographics file \(.*IXI014.*--strict"
    ):
        prepare_brain_cohort(
            "ixi",
            input_dir,
            tmp_path / "IXI.csv",
            out,
            t1_pattern="{subject}_T1_mni_brain.nii.gz",
            strict=True,
            **SMALL,
        )
    disc, table = make_oasis(tmp_path)
    rows = list(csv.reader(table.open()))
    write_csv(table, rows[0], [row[:7] + ["1"] + row[8:] for row in rows[1:]])  # every session CDR 1
    with pytest.raises(DataPreparationError, match="no subject left .*: 1 repeat session, 4 not healthy"):
        prepare_brain_cohort("oasis1", disc, table, out, **SMALL)
    with pytest.raises(DataPreparationError, match="no T1w volume matches"):
        prepare_brain_cohort("ixi", input_dir, tmp_path / "IXI.csv", out, **SMALL)  # the raw names: none here
    assert not out.exists()


def test_find_volumes_patterns(tmp_path):
    save_nifti(tmp_path / "OAS1_0001_MR1" / "OAS1_0001_MR1_t88.nii", np.ones((2, 2, 2)))
    save_nifti(tmp_path / "OAS1_0002_MR1" / "OAS1_0009_MR1_t88.nii", np.ones((2, 2, 2)))  # names disagree: ignored
    assert list(find_volumes(tmp_path, "{subject}/{subject}_t88.nii")) == ["OAS1_0001_MR1"]
    with pytest.raises(DataPreparationError, match=r"with \{subject\} where the subject is named"):
        find_volumes(tmp_path, "*/*_t88.nii")
    save_nifti(tmp_path / "OAS1_0001_MR1" / "OAS1_0001_MR1_t88_v2.nii", np.ones((2, 2, 2)))
    with pytest.raises(DataPreparationError, match="matches two volumes"):
        find_volumes(tmp_path, "{subject}/{subject}_t88*.nii")


def test_rerun_needs_overwrite(tmp_path):
    input_dir, table = make_hcp(tmp_path)
    out = tmp_path / "out"
    prepare_brain_cohort("hcp", input_dir, table, out, **SMALL)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataPreparationError, match="not empty.*--overwrite"):
        prepare_brain_cohort("hcp", input_dir, table, out, **SMALL)
    result = prepare_brain_cohort("hcp", input_dir, table, out, overwrite=True, **{**SMALL, "num_slices": 1})
    assert result.num_slices_written == 4 == len(list((out / "images").iterdir()))
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json", "images", "notes.txt"]
