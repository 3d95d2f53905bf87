"""common.data.cxr.mimic: MIMIC-CXR-JPG preparation, on a small fake MIMIC tree the tests write (PhysioNet layout)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common.data.cxr.mimic as mimic_module
from common.data.cxr.datalist import CHEXPERT_LABELS, ENTRY_KEYS, SPLITS
from common.data.cxr.mimic import (
    GENERATOR,
    DataPreparationError,
    ReportSections,
    convert_image,
    find_csv,
    parse_report,
    prepare_mimic_cxr,
    read_official_split,
    report_sentences,
    resize_center_crop,
    split_sentences,
)
from common.data.splits import split_subjects

SIZE = 64  # small multiple of 8: fast, and the JPGs below are 2-18x larger

METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}

# --------------------------------------------------------------------------------------------------- reports


def _as_mimic(text: str) -> str:
    """A report as MIMIC-CXR writes it: lines start with a space, FINAL REPORT is indented, blank lines and headers
    alone on their line keep a trailing space."""
    lines = []
    for line in text.split("\n"):
        if line == "FINAL REPORT":
            lines.append(" " * 33 + line)
        elif line.endswith(":") or not line:
            lines.append(f" {line} ")
        else:
            lines.append(f" {line}")
    return "\n".join(lines)


REPORT_FULL = _as_mimic(
    """\
FINAL REPORT
EXAMINATION:  CHEST (PA AND LAT)

INDICATION:  ___F with cough and fever  // eval for pneumonia

TECHNIQUE:  Chest PA and lateral

COMPARISON:  Chest radiograph from ___.

FINDINGS:

There is a 1.5 cm nodular opacity in the right upper lobe, approx. 2 cm from
the hilum, new since the prior study.  No pleural effusion or pneumothorax.
The cardiomediastinal silhouette is normal.

IMPRESSION:

Right upper lobe nodule.  Dr. ___ was notified by phone at 10:30 a.m. on ___.

NOTIFICATION:  The findings were discussed with Dr. ___ by ___ on the telephone
on ___ at 10:35 AM, 2 minutes after discovery of the findings.
"""
)

REPORT_IMPRESSION_ONLY = _as_mimic(
    """\
FINAL REPORT
EXAMINATION:  CHEST (PA AND LAT)

INDICATION:  History: ___M with chest pain

COMPARISON:  ___

IMPRESSION:  No acute cardiopulmonary process.
"""
)

REPORT_NEITHER = _as_mimic(
    """\
FINAL REPORT
INDICATION:  Preoperative evaluation.

COMPARISON:  None.

PA AND LATERAL VIEWS OF THE CHEST:  The lungs are clear.  The heart is normal in
size.
"""
)

REPORT_COMBINED = _as_mimic(
    """\
FINAL REPORT
HISTORY:  Shortness of breath.

FINDINGS AND IMPRESSION:  Mild pulmonary vascular congestion, i.e. early
interstitial edema.  Heart size is mildly enlarged.
"""
)

REPORT_WET_READ = _as_mimic(
    """\
WET READ: ___ ___ ___ 5:05 PM
 No pneumonia.
______________________________________________________________________________
FINAL REPORT
EXAMINATION:  CHEST (PA AND LAT)

INDICATION:  ___ year old woman with fever

FINDINGS:

Lungs are well expanded and clear.  The ET tube terminates 4.5 cm above the
carina.

IMPRESSION:

1.  No pneumonia.
2.  Endotracheal tube in standard position.
"""
)

REPORT_SHORT = _as_mimic(
    """\
FINAL REPORT
FINDINGS:  Heart size is normal.  Lungs are clear.

IMPRESSION:  Normal chest.
"""
)

# --------------------------------------------------------------------------------------------------- fake tree

# (subject_id, study_id, dicom_id, view, (width, height) of the JPG, official split); dicom ids in MIMIC's format
IMAGES = (
    ("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA", (240, 160), "train"),
    ("10000032", "50414267", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL", (160, 240), "train"),
    ("10000032", "53189527", "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "PA", (160, 240), "train"),
    ("10000764", "57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "AP", (200, 200), "validate"),
    ("10000764", "51234567", "7b2f1a8c-1d1e2f3a-4b5c6d7e-8f901234-56789abc", "PA", (200, 180), "validate"),
    ("10000764", "55555555", "8c3e2b9d-2e2f3a4b-5c6d7e8f-90123456-789abcde", "PA", (180, 200), "validate"),
    ("11000011", "52000001", "9d4f3cae-3f3a4b5c-6d7e8f90-12345678-9abcdef0", "PA", (200, 200), "test"),
    ("12000022", "53000002", "ae5a4dbf-4a4b5c6d-7e8f9012-3456789a-bcdef012", "PA", (1200, 900), "train"),
    ("13000033", "54000003", "bf6b5ec0-5b5c6d7e-8f901234-56789abc-def01234", "PA", (190, 230), "train"),
)
REPORTS = {
    ("10000032", "50414267"): REPORT_FULL,
    ("10000032", "53189527"): REPORT_IMPRESSION_ONLY,
    # 57375967 (AP only) has no report file: studies without a PA view are never read
    ("10000764", "51234567"): REPORT_NEITHER,
    ("10000764", "55555555"): REPORT_COMBINED,
    ("11000011", "52000001"): REPORT_WET_READ,
    ("12000022", "53000002"): REPORT_SHORT,
    ("13000033", "54000003"): REPORT_SHORT,
}
# CheXpert rows as MIMIC writes them: columns in alphabetical order, values 1.0 / 0.0 / -1.0 / empty;
# study 54000003 has no row
CHEXPERT = {
    ("10000032", "50414267"): {"Lung Lesion": "1.0", "Lung Opacity": "-1.0", "Pleural Effusion": "0.0"},
    ("10000032", "53189527"): {"No Finding": "1.0"},
    ("10000764", "51234567"): {"No Finding": "1.0"},
    ("10000764", "55555555"): {"Edema": "-1.0", "Cardiomegaly": "1.0"},
    ("11000011", "52000001"): {"Pneumonia": "0.0", "Support Devices": "1.0"},
    ("12000022", "53000002"): {"No Finding": "1.0"},
}

KEPT = {
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab",
    "8c3e2b9d-2e2f3a4b-5c6d7e8f-90123456-789abcde",
    "9d4f3cae-3f3a4b5c-6d7e8f90-12345678-9abcdef0",
    "ae5a4dbf-4a4b5c6d-7e8f9012-3456789a-bcdef012",
    "bf6b5ec0-5b5c6d7e-8f901234-56789abc-def01234",
}
DROPPED = {
    "view LATERAL": {"images": 1, "studies": 1},
    "view AP": {"images": 1, "studies": 1},
    "report has neither findings nor impression": {"images": 1, "studies": 1},
}
KEPT_PATIENTS = ["p10000032", "p10000764", "p11000011", "p12000022", "p13000033"]

BACKGROUND, MARGIN, MARK = 90, 250, 255


def marked_radiograph(width: int, height: int) -> Image.Image:
    """8-bit image (height, width): grey centre square with a bright mark at its centre; bright bars at the far
    ends of the long side, which a short-side resize and centre crop must cut away."""
    pixels = np.full((height, width), BACKGROUND, np.uint8)
    side = min(width, height)
    cut = (max(width, height) - side) // 2  # margin cut on each end of the long side
    bar = max(cut - max(8, cut // 3), 0)  # the bars stop before the kept square, clear of the resampling kernel
    if width > height:
        pixels[:, :bar] = MARGIN
        pixels[:, width - bar :] = MARGIN
    elif height > width:
        pixels[:bar] = MARGIN
        pixels[height - bar :] = MARGIN
    r = side // 10
    cy, cx = height // 2, width // 2
    pixels[cy - r : cy + r, cx - r : cx + r] = MARK
    return Image.fromarray(pixels, "L")


def _write_csv(path: Path, columns, rows) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(buffer.getvalue().encode()))
    else:
        path.write_text(buffer.getvalue())


def write_fake_mimic(root: Path, reports_dir: Path | None = None) -> Path:
    """A small MIMIC-CXR-JPG tree at ``root`` (metadata gzipped, split and CheXpert plain) with its reports."""
    reports_dir = root if reports_dir is None else reports_dir
    metadata, splits = [], []
    for subject, study, dicom, view, (w, h), split in IMAGES:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        # an RGB JPG for one image: the preparation must turn it into 8-bit grayscale too
        image = marked_radiograph(w, h)
        (image.convert("RGB") if dicom.startswith("bf6b") else image).save(folder / f"{dicom}.jpg", quality=95)
        metadata.append(
            {
                "dicom_id": dicom,
                "subject_id": subject,
                "study_id": study,
                "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                "ViewPosition": view,
                "Rows": h,
                "Columns": w,
                "StudyDate": "21800506",
                "StudyTime": "213014.531",
                "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                "ViewCodeSequence_CodeMeaning": VIEW_MEANING[view],
                "PatientOrientationCodeSequence_CodeMeaning": "Erect",
            }
        )
        splits.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, metadata)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ("dicom_id", "study_id", "subject_id", "split"), splits)
    label_columns = ("subject_id", "study_id", *sorted(CHEXPERT_LABELS))
    rows = [{"subject_id": s, "study_id": t, **values} for (s, t), values in CHEXPERT.items()]
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", label_columns, rows)
    for (subject, study), text in REPORTS.items():
        path = reports_dir / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    return write_fake_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg" / "2.1.0")


@pytest.fixture(scope="module")
def prepared(mimic, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "mimic_cxr"
    result = prepare_mimic_cxr(mimic, out, size=SIZE, progress=False)
    return out, result, json.loads((out / "datalist.json").read_text())


def _entries(datalist) -> list[dict]:
    return [e for split in SPLITS for e in datalist[split]]


# --------------------------------------------------------------------------------------------------- reports


def test_parse_report_takes_findings_and_impression_only():
    sections = parse_report(REPORT_FULL)
    assert sections.findings == (
        "There is a 1.5 cm nodular opacity in the right upper lobe, approx. 2 cm from the hilum, new since the prior "
        "study. No pleural effusion or pneumothorax. The cardiomediastinal silhouette is normal."
    )
    assert sections.impression == "Right upper lobe nodule. Dr. ___ was notified by phone at 10:30 a.m. on ___."
    assert parse_report(REPORT_IMPRESSION_ONLY) == ReportSections("", "No acute cardiopulmonary process.")
    assert parse_report(REPORT_NEITHER).empty
    combined = parse_report(REPORT_COMBINED)  # a combined section is the impression, as in MIMIC's own parser
    assert combined.findings == "" and combined.impression.startswith("Mild pulmonary vascular congestion, i.e.")
    wet = parse_report(REPORT_WET_READ)  # the wet read ("No pneumonia.") is not the final report's impression
    assert wet.findings.startswith("Lungs are well expanded") and wet.impression.startswith("1. No pneumonia. 2.")


def test_parse_report_headers():
    text = " Findings: Heart size: normal.\n FINDINGS:  More.\n Impression: Clear.\n RECOMMENDATION(S):  None.\n"
    # mixed-case known headers count, "Heart size:" does not, a repeated section is joined, others end a section
    assert parse_report(text) == ReportSections("Heart size: normal. More.", "Clear.")
    assert parse_report(" CONCLUSION:\n ___ is unchanged.\n") == ReportSections("", "___ is unchanged.")
    assert parse_report("") == ReportSections("", "")


def test_split_sentences_keeps_abbreviations_and_decimals():
    sentences = report_sentences(parse_report(REPORT_FULL))
    assert sentences == [
        "There is a 1.5 cm nodular opacity in the right upper lobe, approx. 2 cm from the hilum, new since the prior "
        "study.",
        "No pleural effusion or pneumothorax.",
        "The cardiomediastinal silhouette is normal.",
        "Right upper lobe nodule.",
        "Dr. ___ was notified by phone at 10:30 a.m. on ___.",
    ]
    assert split_sentences("The ET tube terminates 4.5 cm above the carina.  Lines, e.g. the PICC, are unchanged.") == [
        "The ET tube terminates 4.5 cm above the carina.",
        "Lines, e.g. the PICC, are unchanged.",
    ]
    # list numbers go, empty pieces go
    assert split_sentences("1.  No pneumonia. 2.  Endotracheal tube in standard position.") == [
        "No pneumonia.",
        "Endotracheal tube in standard position.",
    ]
    assert split_sentences("   ") == [] and split_sentences("No acute process") == ["No acute process"]


# --------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("shape", [(240, 160), (160, 240), (200, 200), (1200, 900)])
def test_resize_center_crop_keeps_the_centre_and_cuts_the_long_side(tmp_path, shape):
    source = tmp_path / "in.jpg"
    image = marked_radiograph(*shape)
    image.save(source, quality=95)
    assert convert_image(source, tmp_path / "out.png", SIZE) is True
    with Image.open(tmp_path / "out.png") as written:
        assert written.format == "PNG" and written.mode == "L" and written.size == (SIZE, SIZE)
        out = np.asarray(written, dtype=float)
    c = SIZE // 2
    assert out[c - 2 : c + 2, c - 2 : c + 2].min() > 230  # the centre mark survives, centred
    ring = np.concatenate([out[:3].ravel(), out[-3:].ravel(), out[:, :3].ravel(), out[:, -3:].ravel()])
    assert abs(ring.mean() - BACKGROUND) < 6  # the bright bars at the long-side ends are cut
    # same as cropping the centre square by hand and resizing it (the JPEG decoder's downscale for the large one)
    side = min(shape)
    left, top = (shape[0] - side) // 2, (shape[1] - side) // 2
    expected = np.asarray(
        image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.LANCZOS), float
    )
    assert np.abs(out - expected).mean() < 2.5


def test_resize_center_crop_is_exact_on_a_square_grid():
    pixels = np.zeros((10, 30), np.uint8)
    pixels[:, 10:20] = np.arange(100, 200, 10, dtype=np.uint8)[None, :]
    out = resize_center_crop(Image.fromarray(pixels), 10)  # 30x10 -> short side already 10: a pure crop
    np.testing.assert_array_equal(np.asarray(out), pixels[:, 10:20])


# --------------------------------------------------------------------------------------------------- CSV files


def test_find_csv_plain_or_gzipped(tmp_path):
    assert find_csv(tmp_path, "mimic-cxr-2.0.0-split.csv") is None
    (tmp_path / "mimic-cxr-2.0.0-split.csv").write_text("dicom_id\n")
    assert find_csv(tmp_path, "mimic-cxr-2.0.0-split.csv").name == "mimic-cxr-2.0.0-split.csv"
    (tmp_path / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(b"dicom_id\n"))
    assert find_csv(tmp_path, "mimic-cxr-2.0.0-split.csv").name == "mimic-cxr-2.0.0-split.csv.gz"
    (tmp_path / "mimic-cxr-2.1.0-metadata.csv.gz").write_bytes(b"")
    assert find_csv(tmp_path, "mimic-cxr-2.0.0-metadata.csv").name == "mimic-cxr-2.1.0-metadata.csv.gz"


def test_official_split_refuses_a_patient_in_two_splits(tmp_path):
    path = tmp_path / "mimic-cxr-2.0.0-split.csv.gz"
    rows = [
        {"dicom_id": "a", "study_id": "50000001", "subject_id": "10000001", "split": "train"},
        {"dicom_id": "b", "study_id": "50000002", "subject_id": "10000001", "split": "test"},
        {"dicom_id": "c", "study_id": "50000003", "subject_id": "10000002", "split": "validate"},
    ]
    _write_csv(path, ("dicom_id", "study_id", "subject_id", "split"), rows)
    with pytest.raises(
        DataPreparationError, match=r"1 patient\(s\) in more than one split, e.g. p10000001 \(test/train\)"
    ):
        read_official_split(path)
    _write_csv(path, ("dicom_id", "study_id", "subject_id", "split"), rows[:1] + rows[2:])
    assert read_official_split(path) == {"a": "training", "c": "validation"}
    _write_csv(path, ("dicom_id", "study_id", "subject_id"), rows)
    with pytest.raises(DataPreparationError, match="lacks the column.*split"):
        read_official_split(path)


# --------------------------------------------------------------------------------------------------- pipeline


def test_kept_and_dropped(prepared):
    out, result, datalist = prepared
    entries = _entries(datalist)
    assert {e["dicom_id"] for e in entries} == KEPT
    assert datalist["counts"]["dropped"] == DROPPED == result.counts["dropped"]
    assert datalist["counts"]["metadata_images"] == len(IMAGES)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"p{s}_s{t}_{d}.png" for s, t, d, *_ in IMAGES if d in KEPT
    )
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json", "images"]
    assert result.images_written == len(KEPT) and result.images_skipped == 0
    summary = result.summary()
    assert "kept 6 PA images of 6 studies and 5 patients" in summary and "view LATERAL: 1 images" in summary


def test_entries_follow_the_cxr_datalist_layout(mimic, prepared):
    out, _, datalist = prepared
    assert datalist["generator"] == GENERATOR and datalist["image_size"] == [SIZE, SIZE]
    assert datalist["source"]["root"] == str(mimic.resolve()) == datalist["source"]["reports_dir"]
    assert datalist["source"]["metadata_csv"] == "mimic-cxr-2.0.0-metadata.csv.gz"
    assert "PhysioNet" in datalist["description"]
    for e in _entries(datalist):
        assert list(e)[:3] == ["image", "patient", "study"]
        assert set(ENTRY_KEYS) <= set(e) and e["sentences"] and all(s and s == s.strip() for s in e["sentences"])
        assert e["image"] == f"images/{e['patient']}_{e['study']}_{e['dicom_id']}.png"
        with Image.open(out / e["image"]) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "L"
    by_study = {e["study"]: e for e in _entries(datalist)}
    full = by_study["s50414267"]
    assert full["patient"] == "p10000032" and full["sentences"][0].startswith("There is a 1.5 cm nodular opacity")
    assert full["labels"] == {"Lung Lesion": 1.0, "Lung Opacity": -1.0, "Pleural Effusion": 0.0}
    assert list(full["labels"]) == [k for k in CHEXPERT_LABELS if k in full["labels"]]  # CheXpert order
    impression_only = by_study["s53189527"]
    assert impression_only["findings"] == "" and impression_only["sentences"] == ["No acute cardiopulmonary process."]
    assert by_study["s55555555"]["findings"] == "" and len(by_study["s55555555"]["sentences"]) == 2
    assert "labels" not in by_study["s54000003"]  # no CheXpert row
    assert datalist["counts"]["studies_without_labels"] == 1


def test_official_split_is_by_patient(prepared):
    _, result, datalist = prepared
    patients = {split: {e["patient"] for e in datalist[split]} for split in SPLITS}
    assert patients == {
        "training": {"p10000032", "p12000022", "p13000033"},
        "validation": {"p10000764"},
        "test": {"p11000011"},
    }
    assert {k: set(v) for k, v in datalist["patients"].items()} == patients
    assert datalist["counts"]["images"] == {"training": 4, "validation": 1, "test": 1} == result.counts["images"]


def test_random_split_uses_split_subjects(mimic, tmp_path):
    # no split CSV needed for a random split
    root = tmp_path / "root"
    root.mkdir()
    for p in mimic.iterdir():
        if p.name != "mimic-cxr-2.0.0-split.csv":
            (root / p.name).symlink_to(p)
    out = tmp_path / "out"
    prepare_mimic_cxr(root, out, size=SIZE, split="random", val_fraction=0.2, test_fraction=0.2, seed=3, progress=False)
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["patients"] == split_subjects(KEPT_PATIENTS, 0.2, 0.2, 3)
    seen = [
        e["patient"] for split in SPLITS for e in datalist[split] if e["patient"] not in datalist["patients"][split]
    ]
    assert seen == []  # every entry sits in its patient's split, so no patient is in two splits
    assert sum(len(v) for v in datalist["patients"].values()) == len(KEPT_PATIENTS)


def test_rerun_resumes_and_writes_nothing_new(mimic, tmp_path):
    out = tmp_path / "out"
    prepare_mimic_cxr(mimic, out, size=SIZE, limit=3, progress=False)
    images = sorted((out / "images").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in images}
    images[0].unlink()  # as if the first run had been interrupted before this one
    os.utime(images[1], ns=(1, 1))
    result = prepare_mimic_cxr(mimic, out, size=SIZE, limit=3, progress=False)
    assert result.images_written == 1 and result.images_skipped == 2
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert set(after) == set(before) and after[images[1].name] == 1  # untouched
    again = prepare_mimic_cxr(mimic, out, size=SIZE, limit=3, progress=False)
    assert again.images_written == 0 and again.images_skipped == 3
    # another size rewrites; the datalist lists what this run kept
    bigger = prepare_mimic_cxr(mimic, out, size=2 * SIZE, limit=3, progress=False)
    assert bigger.images_written == 3
    assert json.loads((out / "datalist.json").read_text())["image_size"] == [2 * SIZE, 2 * SIZE]
    # a smaller subset leaves the other image in place and says so
    fewer = prepare_mimic_cxr(mimic, out, size=2 * SIZE, limit=2, progress=False)
    assert fewer.images_written == 0 and fewer.extra_images == 1 and "not in this datalist" in fewer.warnings[0]


def test_limit_and_worker_pool(mimic, tmp_path):
    result = prepare_mimic_cxr(mimic, tmp_path / "out", size=SIZE, limit=4, num_workers=2, progress=False)
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert result.images_written == 4 and len(_entries(datalist)) == 4
    # the first four kept images in (patient, study, dicom id) order
    assert [e["study"] for e in _entries(datalist)] == ["s50414267", "s53189527", "s55555555", "s52000001"]


def test_missing_reports_fail_or_are_dropped(mimic, tmp_path):
    reports = tmp_path / "reports"
    write_fake_mimic(tmp_path / "elsewhere", reports_dir=reports)  # reports in a folder of their own
    (reports / "files" / "p11" / "p11000011" / "s52000001.txt").unlink()
    with pytest.raises(
        DataPreparationError,
        match=r"1 of 6 report files of PA studies are missing.*mimic-cxr-reports.zip.*--allow_missing_reports",
    ):
        prepare_mimic_cxr(mimic, tmp_path / "out", reports_dir=reports, size=SIZE, progress=False)
    assert not (tmp_path / "out").exists()
    result = prepare_mimic_cxr(
        mimic, tmp_path / "out", reports_dir=reports / "files", allow_missing_reports=True, size=SIZE, progress=False
    )
    assert result.counts["dropped"]["report file missing"] == {"images": 1, "studies": 1}
    assert result.counts["images"]["test"] == 0


def test_reports_not_extracted_fail_fast(tmp_path, monkeypatch):
    root = write_fake_mimic(tmp_path / "mimic", reports_dir=tmp_path / "reports_elsewhere")
    monkeypatch.setattr(mimic_module, "GIVE_UP_AFTER_MISSING_REPORTS", 2)
    with pytest.raises(
        DataPreparationError, match=r"^2 of 2 report files of PA studies are missing under .*mimic-cxr-reports.zip"
    ):
        prepare_mimic_cxr(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_images_fail_or_are_dropped(tmp_path):
    root = write_fake_mimic(tmp_path / "mimic")
    (root / "files" / "p13" / "p13000033" / "s54000003" / "bf6b5ec0-5b5c6d7e-8f901234-56789abc-def01234.jpg").unlink()
    with pytest.raises(DataPreparationError, match=r"1 of 6 PA images are missing.*--allow_missing_images"):
        prepare_mimic_cxr(root, tmp_path / "out", size=SIZE, progress=False)
    result = prepare_mimic_cxr(root, tmp_path / "out", size=SIZE, allow_missing_images=True, progress=False)
    assert result.counts["dropped"]["image file missing"] == {"images": 1, "studies": 1}


def test_errors_before_any_work(mimic, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataPreparationError, match="MIMIC-CXR-JPG root not found.*physionet.org"):
        prepare_mimic_cxr(tmp_path / "missing", out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        DataPreparationError, match=r"mimic-cxr-2.0.0-metadata.csv\(.gz\) not found in .*empty.*PhysioNet"
    ):
        prepare_mimic_cxr(empty, out, progress=False)
    (empty / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id\n")
    with pytest.raises(DataPreparationError, match=r"mimic-cxr-2.0.0-split.csv\(.gz\) not found.*--split random"):
        prepare_mimic_cxr(empty, out, progress=False)
    with pytest.raises(DataPreparationError, match="unknown split 'patient'.*'official'.*'random'"):
        prepare_mimic_cxr(mimic, out, split="patient", progress=False)
    for size in (0, 500, -8, 64.0, True):
        with pytest.raises(DataPreparationError, match="size must be a positive multiple of 8"):
            prepare_mimic_cxr(mimic, out, size=size, progress=False)
    with pytest.raises(DataPreparationError, match="val_fraction"):
        prepare_mimic_cxr(mimic, out, split="random", val_fraction=1.5, progress=False)
    with pytest.raises(DataPreparationError, match="would mix the outputs"):
        prepare_mimic_cxr(mimic, mimic / "files" / "prepared", progress=False)
    assert not out.exists() and not (mimic / "files" / "prepared").exists()


def test_occupied_output_dir_needs_overwrite(mimic, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataPreparationError, match="not empty and is not a previous run.*--overwrite"):
        prepare_mimic_cxr(mimic, out, size=SIZE, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = prepare_mimic_cxr(mimic, out, size=SIZE, limit=1, overwrite=True, progress=False)
    assert result.images_written == 1 and (out / "notes.txt").read_text() == "keep me"
