"""Preparation of MIMIC-CXR-JPG into the chest X-ray datalist: frontal PA radiographs with their report sentences.

What "Generating Medical Images with MONAI" trained its chest X-ray latent diffusion model on: PA views of
MIMIC-CXR-JPG at 512 x 512 with the findings and impression sections of the free-text reports.

Input, as PhysioNet publishes it (credentialed access; MIMIC-CXR-JPG https://physionet.org/content/mimic-cxr-jpg/,
the reports ``mimic-cxr-reports.zip`` from MIMIC-CXR https://physionet.org/content/mimic-cxr/)::

    <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg
    <root>/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, Rows, Columns, ...
    <root>/mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train / validate / test)
    <root>/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, the 14 CheXpert labels (1.0 / 0.0 / -1.0 / empty)
    <reports_dir>/files/p10/p10000032/s50414267.txt   (``reports_dir`` defaults to ``root``)

Every CSV may be plain (``.csv``) or gzipped (``.csv.gz``). Processing:

1. keep the images whose ``ViewPosition`` is ``PA``; drop the others (lateral, AP, ...), counted by view;
2. per study, read the report, take its FINDINGS and IMPRESSION sections (:func:`parse_report`) and drop the study
   if both are empty; split each section into sentences with pysbd (:func:`split_sentences`);
3. per image: decode the JPG as 8-bit grayscale, resize so that the short side is ``size`` (Lanczos, antialiased)
   and centre-crop ``size x size`` in one resampling (:func:`resize_center_crop`), write a PNG atomically;
4. split by patient: MIMIC's own split (``official``: train / validate / test -> training / validation / test) or
   :func:`common.data.splits.split_subjects` on the patients (``random``);
5. write ``datalist.json`` (layout of :mod:`common.data.cxr.datalist`) last, atomically.

Outputs under ``output_dir``: ``images/p10000032_s50414267_<dicom_id>.png`` and ``datalist.json``. A rerun into
the same folder skips the images already written at the same size, so an interrupted run resumes. The derived
images and texts remain MIMIC data: they fall under the PhysioNet Credentialed Health Data Use Agreement.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import logging
import math
import numbers
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from tqdm import tqdm

from common.data.cxr.datalist import CHEXPERT_LABELS, SPLITS
from common.data.splits import split_subjects
from common.io.atomic import atomic_path, check_output_dir, write_json

__all__ = [
    "METADATA_CSV",
    "SPLIT_CSV",
    "CHEXPERT_CSV",
    "DEFAULT_SIZE",
    "SIZE_MULTIPLE",
    "OFFICIAL_SPLITS",
    "SPLIT_METHODS",
    "SECTION_NAMES",
    "REPORT_ABBREVIATIONS",
    "GENERATOR",
    "DataPreparationError",
    "ImageRecord",
    "ReportSections",
    "PreparationResult",
    "find_csv",
    "read_csv",
    "read_metadata",
    "read_official_split",
    "read_chexpert_labels",
    "parse_report",
    "split_sentences",
    "report_sentences",
    "resize_center_crop",
    "convert_image",
    "prepare_mimic_cxr",
]

logger = logging.getLogger(__name__)

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
DEFAULT_SIZE = 512
#: The autoencoder downsamples x8: an image side must be a multiple of it to give whole latents.
SIZE_MULTIPLE = 8
#: MIMIC-CXR-JPG's split names -> the project's split names.
OFFICIAL_SPLITS: dict[str, str] = {"train": "training", "validate": "validation", "test": "test"}
SPLIT_METHODS = ("official", "random")
#: The view kept: frontal posterior-anterior radiographs, as in the reference article.
KEPT_VIEW = "PA"
GENERATOR = "common.data.cxr.mimic"
TOOL = "tools/prepare_mimic_cxr.py"
#: Without --allow_missing_reports, the scan stops when this many first reports are all missing (not extracted).
GIVE_UP_AFTER_MISSING_REPORTS = 100
#: zlib level of the PNGs: level 3 writes a 512x512 radiograph 3x faster than the default 6 for ~15% more bytes.
PNG_COMPRESS_LEVEL = 3

#: Report section headers (upper case, without the colon) that hold the text kept, and where it goes. A combined
#: "FINDINGS AND IMPRESSION" section is a summary and goes to the impression, as in MIMIC-CXR's own section parser
#: (github.com/MIT-LCP/mimic-cxr); "CONCLUSION" is what some radiologists call the impression.
SECTION_NAMES: dict[str, str] = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS AND IMPRESSIONS": "impression",
    "IMPRESSION AND FINDINGS": "impression",
    "FINDINGS/IMPRESSION": "impression",
}

#: Abbreviations of radiology reports missing from pysbd's English list: their period does not end a sentence
#: before a lower-case word or a number ("approx. 2 cm").
REPORT_ABBREVIATIONS: tuple[str, ...] = ("approx", "cf", "incl", "pt", "pts", "resp")

PHYSIONET_JPG = (
    "MIMIC-CXR-JPG is distributed by PhysioNet under credentialed access: https://physionet.org/content/mimic-cxr-jpg/"
)
PHYSIONET_REPORTS = (
    "the reports are mimic-cxr-reports.zip of MIMIC-CXR (PhysioNet, credentialed access: "
    "https://physionet.org/content/mimic-cxr/)"
)

_IMAGE_NAME = re.compile(r"^p\d+_s\d+_[0-9A-Za-z.-]+\.png$")
# A candidate section header: at the start of a line, a name of letters, spaces and ()/,&- followed by a colon.
# Which candidates are headers is decided in _is_header (all upper case, or a known section name in any case).
_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Za-z][A-Za-z ()/,&-]*[A-Za-z)])[ \t]*:", re.MULTILINE)
# A list number at the start of a sentence ("1. ", "2) "): not part of what the sentence says.
_ENUMERATOR = re.compile(r"^\(?\d{1,2}[.)](?=\s)\s*")


class DataPreparationError(ValueError):
    """Bad input for the preparation (missing files or columns, bad arguments, occupied output folder)."""


# --------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ImageRecord:
    """One image of MIMIC-CXR-JPG, from the metadata CSV. Ids are the digits as MIMIC writes them (no prefix)."""

    dicom_id: str
    subject_id: str  # e.g. "10000032"
    study_id: str  # e.g. "50414267"
    view: str  # ViewPosition, upper case; "" when the DICOM had none

    @property
    def patient(self) -> str:
        """The patient id of the datalist and of MIMIC's folders: ``p10000032``."""
        return f"p{self.subject_id}"

    @property
    def study(self) -> str:
        """The study id of the datalist and of MIMIC's folders: ``s50414267``."""
        return f"s{self.study_id}"

    @property
    def study_folder(self) -> PurePosixPath:
        """``files/p10/p10000032/s50414267``: MIMIC groups patients in folders named by their id's first 2 digits."""
        return PurePosixPath("files", self.patient[:3], self.patient, self.study)

    @property
    def jpg(self) -> PurePosixPath:
        """Path of the JPG relative to the MIMIC-CXR-JPG root."""
        return self.study_folder / f"{self.dicom_id}.jpg"

    @property
    def png_name(self) -> str:
        """File name of the prepared image: ``p10000032_s50414267_<dicom_id>.png``."""
        return f"{self.patient}_{self.study}_{self.dicom_id}.png"


@dataclass(frozen=True)
class ReportSections:
    """The kept sections of a report, each one line of text (hard wraps collapsed); ``""`` when absent."""

    findings: str
    impression: str

    @property
    def empty(self) -> bool:
        """Whether neither section has text."""
        return not self.findings and not self.impression


@dataclass
class PreparationResult:
    """Summary of a preparation run; ``counts`` is the datalist's ``counts``."""

    output_dir: Path
    datalist_path: Path
    counts: dict[str, Any]
    images_written: int
    images_skipped: int  # already in images/ at the right size (resumed run)
    extra_images: int  # PNGs in images/ from earlier runs that this datalist does not list (left in place)
    seconds: float  # whole run
    image_seconds: float  # the image loop alone
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: kept images per split, drops by reason, images written / skipped, time."""
        images, studies, patients = (self.counts[k] for k in ("images", "studies", "patients"))
        per_split = ", ".join(f"{s} {images[s]}" for s in SPLITS)
        dropped = "; ".join(
            f"{reason}: {d['images']} images ({d['studies']} studies)" for reason, d in self.counts["dropped"].items()
        )
        per_image = f" ({1000 * self.image_seconds / self.images_written:.1f} ms each)" if self.images_written else ""
        return (
            f"MIMIC-CXR: kept {sum(images.values())} PA images of {sum(studies.values())} studies and "
            f"{sum(patients.values())} patients ({per_split}) of the {self.counts['metadata_images']} images listed; "
            f"dropped {dropped or 'none'}; wrote {self.images_written} images in {self.image_seconds:.1f} s{per_image}, "
            f"{self.images_skipped} already there; {self.seconds:.1f} s in all"
        )


# --------------------------------------------------------------------------------------------------- CSV files


def find_csv(root: str | os.PathLike, name: str) -> Path | None:
    """Path of the CSV ``name`` (``mimic-cxr-2.0.0-metadata.csv``) in ``root``, gzipped or not; None if absent.

    The published ``.csv.gz`` is preferred; then the decompressed ``.csv``; then the same file of another MIMIC
    version (``mimic-cxr-*-metadata.csv*``, the highest version).
    """
    root = Path(root)
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    kind = name.removesuffix(".csv").rsplit("-", 1)[-1]  # "metadata", "split", "chexpert"
    others = sorted(p for p in root.glob(f"mimic-cxr-*-{kind}.csv*") if p.suffixes[-1] in (".csv", ".gz"))
    return others[-1] if others else None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_csv(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (``.csv`` or ``.csv.gz``) as dicts of stripped strings; checks that ``required`` columns exist.

    Raises:
        DataPreparationError: the file cannot be read, is not gzip although named ``.gz``, or lacks a column.
    """
    path = Path(path)
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in required if c not in columns]
            if missing:
                raise DataPreparationError(
                    f"{path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(columns) or 'no header'}); "
                    "is it the right MIMIC-CXR-JPG file?"
                )
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as e:
        raise DataPreparationError(f"cannot read {path} as a CSV file: {e}") from e


def _digits(value: str, column: str, path: Path) -> str:
    """A MIMIC id as its digits; tolerates ``"10000032.0"`` (a CSV re-saved by pandas)."""
    text = value.removesuffix(".0")
    if not text.isdigit():
        raise DataPreparationError(f"{path}: column {column} holds {value!r}, not a MIMIC id (digits)")
    return text


def read_metadata(path: str | os.PathLike) -> list[ImageRecord]:
    """The images listed by ``mimic-cxr-2.0.0-metadata.csv(.gz)``, in file order."""
    path = Path(path)
    rows = read_csv(path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    if not rows:
        raise DataPreparationError(f"{path} lists no image")
    return [
        ImageRecord(
            dicom_id=row["dicom_id"],
            subject_id=_digits(row["subject_id"], "subject_id", path),
            study_id=_digits(row["study_id"], "study_id", path),
            view=row["ViewPosition"].upper(),
        )
        for row in rows
    ]


def read_official_split(path: str | os.PathLike) -> dict[str, str]:
    """``dicom_id -> training / validation / test`` from ``mimic-cxr-2.0.0-split.csv(.gz)``.

    Raises:
        DataPreparationError: an unknown split name, or a patient in more than one split (the official split is by
            patient; a patient in two splits would leak images of one person between training and test).
    """
    path = Path(path)
    rows = read_csv(path, ("dicom_id", "subject_id", "split"))
    unknown = sorted({row["split"] for row in rows} - set(OFFICIAL_SPLITS))
    if unknown:
        raise DataPreparationError(
            f"{path}: unknown split name(s) {', '.join(map(repr, unknown))}; expected {', '.join(OFFICIAL_SPLITS)}"
        )
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of[_digits(row["subject_id"], "subject_id", path)].add(row["split"])
    mixed = sorted(s for s, names in splits_of.items() if len(names) > 1)
    if mixed:
        examples = ", ".join(f"p{s} ({'/'.join(sorted(splits_of[s]))})" for s in mixed[:5])
        raise DataPreparationError(
            f"{path} puts {len(mixed)} patient(s) in more than one split, e.g. {examples}: the official split must be "
            "by patient; fix the file or use --split random"
        )
    return {row["dicom_id"]: OFFICIAL_SPLITS[row["split"]] for row in rows}


def _label_value(text: str, label: str, path: Path) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (1.0, 0.0, -1.0):
        raise DataPreparationError(
            f"{path}: label {label!r} holds {text!r}; CheXpert values are 1.0, 0.0, -1.0 or empty"
        )
    return value


def read_chexpert_labels(path: str | os.PathLike) -> dict[tuple[str, str], dict[str, float]]:
    """``(subject_id, study_id) -> {label: value}`` from ``mimic-cxr-2.0.0-chexpert.csv(.gz)``.

    Labels in :data:`~common.data.cxr.datalist.CHEXPERT_LABELS` order; an empty cell (not mentioned) is left out.
    """
    path = Path(path)
    rows = read_csv(path, ("subject_id", "study_id", *CHEXPERT_LABELS))
    labels = {}
    for row in rows:
        key = (_digits(row["subject_id"], "subject_id", path), _digits(row["study_id"], "study_id", path))
        values = {label: _label_value(row[label], label, path) for label in CHEXPERT_LABELS}
        labels[key] = {label: v for label, v in values.items() if v is not None}
    return labels


# --------------------------------------------------------------------------------------------------- reports


def _is_header(name: str) -> bool:
    # all-caps names are MIMIC's headers; a known section may also be written in mixed case ("Impression:"), but
    # other mixed-case words before a colon ("Heart size:") are report text
    return name.isupper() or " ".join(name.upper().split()) in SECTION_NAMES


def _collapse(text: str) -> str:
    """Join hard-wrapped lines and runs of spaces into single spaces."""
    return " ".join(text.split())


def parse_report(text: str) -> ReportSections:
    """The FINDINGS and IMPRESSION sections of a MIMIC-CXR report, each as one line of text.

    A section runs from its header (a line starting with an upper-case name and a colon, e.g. ``FINDINGS:``; text may
    follow on the same line) to the next header. Headers are mapped by :data:`SECTION_NAMES`; other sections
    (``INDICATION:``, ``COMPARISON:``, ``WET READ:``, ...) and the text before the first header are ignored. A
    section that appears twice is joined in order. Line wraps are collapsed; ``___`` (de-identification) is kept.
    """
    headers = [m for m in _HEADER.finditer(text) if _is_header(m.group("name"))]
    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    for i, match in enumerate(headers):
        kind = SECTION_NAMES.get(" ".join(match.group("name").upper().split()))
        if kind is None:
            continue
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = _collapse(text[match.end() : end])
        if body:
            parts[kind].append(body)
    return ReportSections(findings=" ".join(parts["findings"]), impression=" ".join(parts["impression"]))


@functools.cache
def _segmenter():
    """pysbd's English segmenter with :data:`REPORT_ABBREVIATIONS` added (one per process; pysbd is pure Python)."""
    import pysbd
    from pysbd.lang.english import English

    class ReportEnglish(English):
        class Abbreviation(English.Abbreviation):
            ABBREVIATIONS = [*English.Abbreviation.ABBREVIATIONS, *REPORT_ABBREVIATIONS]

    segmenter = pysbd.Segmenter(language="en", clean=False)
    # pysbd selects its rules by language code only; its rule tables live on the language class it keeps here
    segmenter.language_module = ReportEnglish
    return segmenter


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` by pysbd, stripped, list numbers (``"1. "``) removed, empty ones dropped."""
    if not text.strip():
        return []
    sentences = (_ENUMERATOR.sub("", s.strip()).strip() for s in _segmenter().segment(text))
    return [s for s in sentences if s]


def report_sentences(sections: ReportSections) -> list[str]:
    """The sentences of the findings, then of the impression."""
    return split_sentences(sections.findings) + split_sentences(sections.impression)


def _reports_files_dir(reports_dir: Path) -> Path:
    # mimic-cxr-reports.zip extracts to files/p10/...; accept the files/ folder itself as well
    return reports_dir / "files" if (reports_dir / "files").is_dir() else reports_dir


def _report_path(files_dir: Path, record: ImageRecord) -> Path:
    """``<files_dir>/p10/p10000032/s50414267.txt``."""
    return files_dir / record.patient[:3] / record.patient / f"{record.study}.txt"


# --------------------------------------------------------------------------------------------------- images


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the short side is ``size`` and centre-crop ``size x size``, in one Lanczos resampling.

    The source square (side = short side, centred, sub-pixel exact) is resampled straight to (size, size), which is
    the resize-then-crop of the whole image without computing the cut margins. Lanczos is antialiased: downsampling
    widens the kernel to the scale. Works in any Pillow mode; returns an image of shape (size, size).
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def _open_grayscale(path: Path, size: int) -> Image.Image:
    """Decode a JPG as 8-bit grayscale, letting the JPEG decoder shrink it by 1/2-1/8 while its short side stays
    at least 2 * ``size``.

    The decoder's DCT-domain scaling averages blocks (antialiased) and makes decoding a 2500x3000 radiograph ~1.6x
    faster; keeping 2x the target for the Lanczos step makes the result differ from a full decode by ~0.5 grey
    levels on average.
    """
    with Image.open(path) as image:
        width, height = image.size
        factor = 2 * size / min(width, height)
        if factor < 1:
            image.draft("L", (math.ceil(width * factor), math.ceil(height * factor)))
        return image.convert("L")  # a new image: the file can be closed


def _png_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size if image.format == "PNG" else None
    except (OSError, ValueError):
        return None


def convert_image(
    source: str | os.PathLike, destination: str | os.PathLike, size: int, overwrite: bool = False
) -> bool:
    """Write ``source`` (a JPG) as a ``size x size`` 8-bit grayscale PNG at ``destination``, atomically.

    Returns False, writing nothing, when ``destination`` already is a PNG of that size and not ``overwrite``
    (a resumed run), True when it wrote.

    Raises:
        DataPreparationError: ``source`` cannot be decoded.
    """
    source, destination = Path(source), Path(destination)
    if not overwrite and _png_size(destination) == (size, size):
        return False
    try:
        image = resize_center_crop(_open_grayscale(source, size), size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataPreparationError(
            f"cannot read {source} as an image: {e}; fix or remove it and rerun to resume"
        ) from e
    with atomic_path(destination) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return True


def _convert_job(job: tuple[str, str, int, bool]) -> bool:
    """Process-pool entry point: :func:`convert_image` on a picklable tuple."""
    return convert_image(*job)


def _run_conversions(jobs: list[tuple[str, str, int, bool]], num_workers: int, progress: bool) -> tuple[int, int]:
    """Run the image jobs (in ``num_workers`` processes, or here when 0) under a progress bar; (written, skipped)."""
    written = 0
    with tqdm(total=len(jobs), desc="MIMIC-CXR images", unit="image", disable=not progress) as bar:
        if num_workers == 0:
            results: Iterable[bool] = map(_convert_job, jobs)
            executor = None
        else:
            executor = ProcessPoolExecutor(max_workers=num_workers)
            # chunks amortise the inter-process round trip; small enough that the bar moves
            results = executor.map(_convert_job, jobs, chunksize=max(1, min(32, len(jobs) // (8 * num_workers))))
        try:
            for did_write in results:
                written += int(did_write)
                bar.update()
        finally:
            if executor is not None:
                executor.shutdown(cancel_futures=True)
    return written, len(jobs) - written


# --------------------------------------------------------------------------------------------------- selection


class _Drops:
    """Images and studies dropped, by reason."""

    def __init__(self) -> None:
        self.images: Counter[str] = Counter()
        self.studies: dict[str, set[tuple[str, str]]] = defaultdict(set)

    def add(self, reason: str, records: Iterable[ImageRecord]) -> None:
        for r in records:
            self.images[reason] += 1
            self.studies[reason].add((r.subject_id, r.study_id))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {reason: {"images": n, "studies": len(self.studies[reason])} for reason, n in self.images.items()}


@dataclass
class _Study:
    """A kept study: its PA images (sorted by dicom id), its report sections and their sentences."""

    records: list[ImageRecord]
    sections: ReportSections
    sentences: list[str]


def _group_pa_studies(records: list[ImageRecord], drops: _Drops) -> list[list[ImageRecord]]:
    """PA images grouped by study, sorted by (patient, study, dicom id); other views are dropped by view."""
    studies: dict[tuple[str, str], list[ImageRecord]] = defaultdict(list)
    for r in records:
        if r.view == KEPT_VIEW:
            studies[(r.subject_id, r.study_id)].append(r)
        else:
            drops.add(f"view {r.view or '(none)'}", [r])
    return [sorted(studies[key], key=lambda r: r.dicom_id) for key in sorted(studies)]


def _select_studies(
    studies: list[list[ImageRecord]],
    root: Path,
    reports_files: Path,
    limit: int | None,
    drops: _Drops,
    progress: bool = False,
    give_up: int | None = None,
) -> tuple[list[_Study], list[Path], list[Path]]:
    """Read the report of each PA study in order until ``limit`` images are kept; drop studies without sections.

    Returns ``(kept, missing_reports, missing_images)``; studies with a missing file are not kept, the caller
    decides whether that is an error. Reads nothing but reports and file existence; splits the kept reports into
    sentences (~0.5 ms a report). Stops early when the first ``give_up`` reports are all missing.
    """
    kept: list[_Study] = []
    missing_reports: list[Path] = []
    missing_images: list[Path] = []
    n_images = n_reports = 0
    for records in tqdm(studies, desc="MIMIC-CXR reports", unit="study", disable=not progress):
        if limit is not None and n_images >= limit:
            break
        if give_up is not None and n_reports == 0 and len(missing_reports) >= give_up:
            break  # the reports are not there at all: say so now, not after checking every study
        report = _report_path(reports_files, records[0])
        if not report.is_file():
            missing_reports.append(report)
            drops.add("report file missing", records)
            continue
        n_reports += 1
        sections = parse_report(report.read_text(encoding="utf-8", errors="replace"))
        if sections.empty:
            drops.add("report has neither findings nor impression", records)
            continue
        present = [r for r in records if (root / r.jpg).is_file()]
        missing_images.extend(root / r.jpg for r in records if r not in present)
        drops.add("image file missing", [r for r in records if r not in present])
        if limit is not None:
            present = present[: limit - n_images]
        if present:
            kept.append(_Study(present, sections, report_sentences(sections)))
            n_images += len(present)
    return kept, missing_reports, missing_images


def _missing_files_error(what: str, paths: list[Path], total: int, where: str, fix: str) -> DataPreparationError:
    examples = ", ".join(str(p) for p in paths[:3])
    return DataPreparationError(f"{len(paths)} of {total} {what} are missing under {where} (e.g. {examples}); {fix}")


# --------------------------------------------------------------------------------------------------- checks


def _check_arguments(
    size: Any, split: Any, val_fraction: float, test_fraction: float, seed: Any, limit: Any, num_workers: Any
) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not is_int(size) or size <= 0 or size % SIZE_MULTIPLE:
        raise DataPreparationError(
            f"size must be a positive multiple of {SIZE_MULTIPLE} (the autoencoder downsamples x{SIZE_MULTIPLE}), "
            f"got {size!r}; the reference is {DEFAULT_SIZE}"
        )
    if split not in SPLIT_METHODS:
        raise DataPreparationError(
            f"unknown split {split!r}: use 'official' (MIMIC-CXR's own patient split) or 'random' "
            "(split_subjects on the patients with --val_fraction, --test_fraction, --seed)"
        )
    if split == "random":
        if not is_int(seed):
            raise DataPreparationError(f"seed must be an integer, got {seed!r}")
        try:
            split_subjects([], val_fraction, test_fraction, seed)  # validates the fractions before any work
        except (TypeError, ValueError) as e:
            raise DataPreparationError(str(e)) from e
    if limit is not None and (not is_int(limit) or limit < 1):
        raise DataPreparationError(f"limit must be a positive integer (number of images) or None, got {limit!r}")
    if not is_int(num_workers) or num_workers < 0:
        raise DataPreparationError(f"num_workers must be 0 (no pool) or a positive integer, got {num_workers!r}")


def _is_previous_run(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds only what this tool writes: ``images/`` of its PNGs and its ``datalist.json``."""
    for entry in output_dir.iterdir():
        if entry.name == "images" and entry.is_dir():
            if any(not (p.name.startswith(".") or _IMAGE_NAME.match(p.name)) for p in entry.iterdir()):
                return False
        elif entry.name == "datalist.json" and entry.is_file():
            try:
                if json.loads(entry.read_text()).get("generator") != GENERATOR:
                    return False
            except (OSError, ValueError, AttributeError):
                return False
        else:
            return False
    return True


def _check_output_dir(output_dir: Path, root: Path, overwrite: bool) -> None:
    try:
        check_output_dir(output_dir)
    except ValueError as e:
        raise DataPreparationError(str(e)) from e
    out, src = output_dir.resolve(), root.resolve()
    if out == src or out in src.parents or (src / "files") in (out, *out.parents):
        raise DataPreparationError(
            f"output directory {output_dir} would mix the outputs with MIMIC-CXR-JPG at {root}: give a folder outside "
            "the data set"
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite and not _is_previous_run(output_dir):
        raise DataPreparationError(
            f"output directory {output_dir} is not empty and is not a previous run of {TOOL} (images/ of "
            "p<patient>_s<study>_<dicom_id>.png and its datalist.json): give an empty folder, or pass --overwrite "
            "to write into it anyway (every image is then rewritten)"
        )


def _locate_csv(root: Path, given: str | os.PathLike | None, name: str, what: str, hint: str = "") -> Path:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise DataPreparationError(f"{what} CSV not found: {path}")
        return path
    path = find_csv(root, name)
    if path is None:
        raise DataPreparationError(
            f"{name}(.gz) not found in {root}: it ships with MIMIC-CXR-JPG. {PHYSIONET_JPG}. Give its path with "
            f"--{what}_csv if it lies elsewhere{hint}."
        )
    return path


def _locate_chexpert(root: Path, chexpert_csv: str | os.PathLike | bool | None) -> Path | None:
    """``"auto"``: the root's CheXpert CSV when present; None / False / ``""`` / ``"none"``: no labels; else a path."""
    if chexpert_csv is None or chexpert_csv is False or str(chexpert_csv).strip().lower() in ("", "none", "false"):
        return None
    if chexpert_csv == "auto":
        return find_csv(root, CHEXPERT_CSV)
    return _locate_csv(root, chexpert_csv, CHEXPERT_CSV, "chexpert")


@dataclass(frozen=True)
class _Inputs:
    """Where the input files are; checked to exist."""

    root: Path
    reports_dir: Path
    metadata_csv: Path
    split_csv: Path | None
    chexpert_csv: Path | None


def _locate_inputs(
    root: str | os.PathLike,
    reports_dir: str | os.PathLike | None,
    metadata_csv: str | os.PathLike | None,
    split_csv: str | os.PathLike | None,
    chexpert_csv: str | os.PathLike | bool | None,
    official: bool,
) -> _Inputs:
    """Check the root and reports folders and find the CSVs (a given path must exist; else looked up in root); the
    split CSV only for the ``official`` split."""
    root = Path(root)
    if not root.is_dir():
        raise DataPreparationError(f"MIMIC-CXR-JPG root not found: {root}. {PHYSIONET_JPG}")
    reports = root if reports_dir is None else Path(reports_dir)
    if not reports.is_dir():
        raise DataPreparationError(f"reports directory not found: {reports}; {PHYSIONET_REPORTS}")
    return _Inputs(
        root=root,
        reports_dir=reports,
        metadata_csv=_locate_csv(root, metadata_csv, METADATA_CSV, "metadata"),
        split_csv=_locate_csv(root, split_csv, SPLIT_CSV, "split", ", or use --split random") if official else None,
        chexpert_csv=_locate_chexpert(root, chexpert_csv),
    )


def _check_missing(
    inputs: _Inputs,
    studies: list[_Study],
    missing_reports: list[Path],
    missing_images: list[Path],
    allow_missing_reports: bool,
    allow_missing_images: bool,
) -> None:
    """Raise, naming counts, examples and the fix, for missing report or JPG files that are not allowed."""
    if missing_reports and not allow_missing_reports:
        raise _missing_files_error(
            "report files of PA studies",
            missing_reports,
            len(studies) + len(missing_reports),
            str(inputs.reports_dir),
            f"{PHYSIONET_REPORTS}; extract it there or give --reports_dir, or pass --allow_missing_reports to drop "
            "these studies",
        )
    if missing_images and not allow_missing_images:
        raise _missing_files_error(
            "PA images",
            missing_images,
            sum(len(s.records) for s in studies) + len(missing_images),
            f"{inputs.root}/files",
            "download them (a partial download of MIMIC-CXR-JPG, e.g. only files/p10, needs it too) or pass "
            "--allow_missing_images to drop them",
        )


# --------------------------------------------------------------------------------------------------- datalist


def _assign_splits(
    studies: list[_Study],
    method: str,
    official: dict[str, str] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    split_path: Path | None,
) -> dict[str, str]:
    """``patient -> split`` for the kept patients."""
    if method == "random":
        patients = sorted({s.records[0].patient for s in studies})
        splits = split_subjects(patients, val_fraction, test_fraction, seed)
        return {p: name for name, ids in splits.items() for p in ids}
    assert official is not None
    missing = [r.dicom_id for s in studies for r in s.records if r.dicom_id not in official]
    if missing:
        raise DataPreparationError(
            f"{len(missing)} kept image(s) are not in {split_path} (e.g. {', '.join(missing[:3])}): use the split file "
            "of the same MIMIC-CXR-JPG release, or --split random"
        )
    return {s.records[0].patient: official[r.dicom_id] for s in studies for r in s.records}


def _entry(
    record: ImageRecord, sections: ReportSections, sentences: list[str], labels: dict[str, float] | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "image": f"images/{record.png_name}",
        "patient": record.patient,
        "study": record.study,
        "dicom_id": record.dicom_id,
        "findings": sections.findings,
        "impression": sections.impression,
        "sentences": sentences,
    }
    if labels is not None:
        entry["labels"] = labels
    return entry


def _description(
    counts: dict[str, Any], size: int, split: str, seed: int, val_fraction: float, test_fraction: float
) -> str:
    how = (
        "the official MIMIC-CXR-JPG split (by patient: train/validate/test)"
        if split == "official"
        else f"split_subjects on the patients (seed {seed}, validation {val_fraction}, test {test_fraction})"
    )
    return (
        f"MIMIC-CXR-JPG frontal PA chest radiographs ({sum(counts['images'].values())} images of "
        f"{sum(counts['patients'].values())} patients) with the findings and impression sections of their reports, "
        f"split into sentences by pysbd; 8-bit grayscale PNG, short side resized to {size} (Lanczos) and "
        f"centre-cropped to {size}x{size}; split by {how}. Derived from MIMIC-CXR: use and sharing fall under the "
        "PhysioNet Credentialed Health Data Use Agreement."
    )


def _split_entries(
    studies: list[_Study], split_of: dict[str, str], labels: dict[tuple[str, str], dict[str, float]] | None
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Datalist entries per split, in (patient, study, dicom id) order, and the number of studies without labels."""
    entries: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    no_labels = 0
    for study in studies:
        first = study.records[0]
        study_labels = None if labels is None else labels.get((first.subject_id, first.study_id))
        no_labels += int(labels is not None and study_labels is None)
        for record in study.records:
            entries[split_of[record.patient]].append(
                _entry(record, study.sections, list(study.sentences), study_labels)
            )
    return entries, no_labels


def _counts(
    entries: dict[str, list[dict[str, Any]]], metadata_images: int, drops: _Drops, no_labels: int | None
) -> dict[str, Any]:
    """The datalist's ``counts``: images, studies and patients per split, images listed, drops by reason."""
    counts: dict[str, Any] = {
        "images": {name: len(entries[name]) for name in SPLITS},
        "studies": {name: len({e["study"] for e in entries[name]}) for name in SPLITS},
        "patients": {name: len({e["patient"] for e in entries[name]}) for name in SPLITS},
        "metadata_images": metadata_images,
        "dropped": drops.as_dict(),
    }
    if no_labels is not None:
        counts["studies_without_labels"] = no_labels
    return counts


def _datalist(
    entries: dict[str, list[dict[str, Any]]],
    counts: dict[str, Any],
    inputs: _Inputs,
    size: int,
    limit: int | None,
    split: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, Any]:
    """The whole ``datalist.json``: description, provenance, settings, counts, patients per split, entries."""
    random = split == "random"
    return {
        "description": _description(counts, size, split, seed, val_fraction, test_fraction),
        "generator": GENERATOR,
        "image_size": [size, size],
        "source": {
            "dataset": "MIMIC-CXR-JPG",
            "root": str(inputs.root.resolve()),
            "reports_dir": str(inputs.reports_dir.resolve()),
            "metadata_csv": inputs.metadata_csv.name,
            "split_csv": None if inputs.split_csv is None else inputs.split_csv.name,
            "chexpert_csv": None if inputs.chexpert_csv is None else inputs.chexpert_csv.name,
        },
        "preparation": {
            "tool": TOOL,
            "view": KEPT_VIEW,
            "sections": "findings, impression",
            "sentence_splitter": "pysbd (English, with report abbreviations)",
            "resize": f"short side to {size} (Lanczos), centre crop {size}x{size}, 8-bit grayscale",
            "split": split,
            "seed": seed if random else None,
            "val_fraction": val_fraction if random else None,
            "test_fraction": test_fraction if random else None,
            "limit": limit,
        },
        "counts": counts,
        "patients": {name: sorted({e["patient"] for e in entries[name]}) for name in SPLITS},
        **entries,
    }


def _count_extra_images(images_dir: Path, names: set[str]) -> int:
    if not images_dir.is_dir():
        return 0
    return sum(1 for p in images_dir.iterdir() if _IMAGE_NAME.match(p.name) and p.name not in names)


def _remove_stale_temporaries(images_dir: Path) -> None:
    # a run killed mid-write leaves atomic_path's hidden temporary folders (.<name>.png.<random>.tmp) behind
    if images_dir.is_dir():
        for p in images_dir.iterdir():
            if p.is_dir() and p.name.startswith(".p") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- pipeline


def prepare_mimic_cxr(
    root: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    reports_dir: str | os.PathLike | None = None,
    size: int = DEFAULT_SIZE,
    split: str = "official",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    metadata_csv: str | os.PathLike | None = None,
    split_csv: str | os.PathLike | None = None,
    chexpert_csv: str | os.PathLike | bool | None = "auto",
    limit: int | None = None,
    num_workers: int = 0,
    allow_missing_reports: bool = False,
    allow_missing_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PreparationResult:
    """Prepare MIMIC-CXR-JPG PA radiographs (size x size PNG) and their report sentences into ``datalist.json``.

    See the module docstring for the layout and the processing. Every check runs before an image is written:
    arguments, root and CSVs, output folder, views, reports (missing files are an error unless
    ``allow_missing_reports``, which drops their studies), JPG files (likewise with ``allow_missing_images``),
    split. ``limit`` keeps the first ``limit`` kept images in (patient, study, dicom id) order, a quick subset
    (with the official split mostly training patients). ``chexpert_csv``: ``"auto"`` adds the labels of the root's
    CheXpert CSV when it is there, a path adds those, None adds none. ``overwrite`` allows a non-empty folder that is
    not a previous run and rewrites every image; without it, images already written at ``size`` are kept.

    Returns:
        The counts written to the datalist, images written and skipped, and the time taken (s).
    """
    start = time.perf_counter()
    _check_arguments(size, split, val_fraction, test_fraction, seed, limit, num_workers)
    inputs = _locate_inputs(root, reports_dir, metadata_csv, split_csv, chexpert_csv, official=split == "official")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, inputs.root, overwrite)

    records = read_metadata(inputs.metadata_csv)
    official = read_official_split(inputs.split_csv) if split == "official" else None
    labels = read_chexpert_labels(inputs.chexpert_csv) if inputs.chexpert_csv is not None else None
    drops = _Drops()
    pa_studies = _group_pa_studies(records, drops)
    reports_files = _reports_files_dir(inputs.reports_dir)
    give_up = None if allow_missing_reports else GIVE_UP_AFTER_MISSING_REPORTS
    studies, missing_reports, missing_images = _select_studies(
        pa_studies, inputs.root, reports_files, limit, drops, progress, give_up
    )
    _check_missing(inputs, studies, missing_reports, missing_images, allow_missing_reports, allow_missing_images)
    if not studies:
        raise DataPreparationError(
            f"no PA image with a report section is left of the {len(records)} images in {inputs.metadata_csv} "
            f"(dropped: {drops.as_dict()})"
        )
    split_of = _assign_splits(studies, split, official, val_fraction, test_fraction, seed, inputs.split_csv)
    entries, no_labels = _split_entries(studies, split_of, labels)

    images_dir = output_dir / "images"
    _remove_stale_temporaries(images_dir)
    jobs = [
        (str(inputs.root / r.jpg), str(images_dir / r.png_name), size, overwrite) for s in studies for r in s.records
    ]
    image_start = time.perf_counter()
    written, skipped = _run_conversions(jobs, num_workers, progress)
    image_seconds = time.perf_counter() - image_start

    counts = _counts(entries, len(records), drops, None if labels is None else no_labels)
    settings = {"split": split, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    datalist_path = output_dir / "datalist.json"
    write_json(datalist_path, _datalist(entries, counts, inputs, size, limit, **settings))
    extra = _count_extra_images(images_dir, {Path(j[1]).name for j in jobs})
    warnings = (
        [f"{extra} PNG(s) in {images_dir} from earlier runs are not in this datalist (left in place)"] if extra else []
    )
    result = PreparationResult(
        output_dir=output_dir,
        datalist_path=datalist_path,
        counts=counts,
        images_written=written,
        images_skipped=skipped,
        extra_images=extra,
        seconds=time.perf_counter() - start,
        image_seconds=image_seconds,
        warnings=warnings,
    )
    for message in warnings:
        logger.warning(message)
    logger.info(result.summary())
    return result
