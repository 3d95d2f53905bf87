#!/usr/bin/env python
"""Prepare MIMIC-CXR-JPG (PA views and their report sentences) into the 512x512 data set of ``cxr_ldm``.

Example::

    prepare-mimic-cxr --root /data/physionet.org/files/mimic-cxr-jpg/2.1.0 --output_dir /data/mimic_cxr_512 \\
        --reports_dir /data/mimic-cxr-reports --num_workers 8

Input: MIMIC-CXR-JPG as PhysioNet publishes it (``files/p10/p10000032/s50414267/<dicom_id>.jpg`` and the
``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv(.gz)`` files) and the free-text reports of MIMIC-CXR
(``mimic-cxr-reports.zip`` extracted: ``files/p10/p10000032/s50414267.txt``), both under PhysioNet credentialed
access. Output: ``<output_dir>/images/p10000032_s50414267_<dicom_id>.png`` (8-bit grayscale, size x size) and
``<output_dir>/datalist.json`` (training / validation / test by patient). A rerun resumes: images already written
at the same size are skipped. Processing details: ``common/data/cxr/mimic.py``.
"""

from __future__ import annotations

import logging
import sys

import fire

from common.data.cxr.mimic import DEFAULT_SIZE, DataPreparationError, prepare_mimic_cxr


def _optional_str(value: object) -> str | None:
    # fire turns "--x None" into None and "--x 123" into an int; paths are strings either way
    return None if value is None else str(value)


def main(
    root: str,
    output_dir: str,
    reports_dir: str | None = None,
    size: int = DEFAULT_SIZE,
    split: str = "official",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    metadata_csv: str | None = None,
    split_csv: str | None = None,
    chexpert_csv: str | None = "auto",
    limit: int | None = None,
    num_workers: int = 0,
    allow_missing_reports: bool = False,
    allow_missing_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Prepare PA chest radiographs of MIMIC-CXR-JPG and the sentences of their reports.

    Args:
        root: MIMIC-CXR-JPG folder (holds files/ and the mimic-cxr-2.0.0-*.csv.gz files).
        output_dir: where images/ and datalist.json go; empty, absent, or a previous run of this tool (resumed).
        reports_dir: folder where mimic-cxr-reports.zip was extracted (holds files/p10/...); default: root.
        size: side of the square output images in pixels; a positive multiple of 8 (the reference is 512).
        split: "official" (MIMIC-CXR's patient split: train/validate/test) or "random" (split_subjects on patients).
        val_fraction: with --split random, fraction of patients for validation.
        test_fraction: with --split random, fraction of patients for test.
        seed: with --split random, seed of the patient split.
        metadata_csv: path of mimic-cxr-2.0.0-metadata.csv(.gz) if it is not in root.
        split_csv: path of mimic-cxr-2.0.0-split.csv(.gz) if it is not in root.
        chexpert_csv: "auto" (root's mimic-cxr-2.0.0-chexpert.csv(.gz) when present), a path, or none (no labels).
        limit: keep only the first N images (patient, study, dicom id order): a quick subset.
        num_workers: processes converting images; 0 converts in this process.
        allow_missing_reports: drop (and count) studies without a report file instead of failing.
        allow_missing_images: drop (and count) images whose JPG is missing (partial download) instead of failing.
        overwrite: write into a non-empty folder that is not a previous run, rewriting every image.
        progress: show a progress bar.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = prepare_mimic_cxr(
            str(root),
            str(output_dir),
            reports_dir=_optional_str(reports_dir),
            size=size,
            split=str(split),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            metadata_csv=_optional_str(metadata_csv),
            split_csv=_optional_str(split_csv),
            chexpert_csv=chexpert_csv if isinstance(chexpert_csv, bool) else _optional_str(chexpert_csv),
            limit=limit,
            num_workers=num_workers,
            allow_missing_reports=allow_missing_reports,
            allow_missing_images=allow_missing_images,
            overwrite=overwrite,
            progress=progress,
        )
    except DataPreparationError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(result.summary())
    print(f"datalist: {result.datalist_path}")


def cli() -> None:
    """Entry point of ``prepare-mimic-cxr``."""
    fire.Fire(main)


if __name__ == "__main__":
    cli()
