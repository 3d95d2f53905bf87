#!/usr/bin/env python
"""Prepare registered brain MRI (UK Biobank layout) into the 2D slice data set of ``brain_t1_ldm`` and its ControlNet.

Example::

    python tools/prepare_brain_mri.py --input_dir /data/ukbb --output_dir /data/ukbb_slices --with_flair

Input: ``<input_dir>/<subject>/T1/T1_brain_to_MNI.nii.gz`` (and ``T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz``
with ``--with_flair``); other layouts through ``--t1_pattern`` / ``--flair_pattern`` (globs relative to the
input directory). Output: ``<output_dir>/images/<subject>_slice-<z>_T1w.nii.gz`` (and ``_FLAIR``), 160x224,
in [0, 1], and ``<output_dir>/datalist.json`` (training / validation / test, split by subject). Processing
details: ``common/data/mri_preparation.py``.
"""

from __future__ import annotations

import logging
import sys

import fire

from common.data.brain.mri_preparation import (
    DEFAULT_CAPTION,
    DEFAULT_FLAIR_PATTERN,
    DEFAULT_T1_PATTERN,
    DEFAULT_TARGET_SHAPE,
    DataPreparationError,
    prepare_brain_mri,
)


def main(
    input_dir: str,
    output_dir: str,
    with_flair: bool = False,
    num_slices: int = 5,
    slice_step: int = 1,
    slice_center: str = "volume",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    t1_pattern: str = DEFAULT_T1_PATTERN,
    flair_pattern: str = DEFAULT_FLAIR_PATTERN,
    caption: str = DEFAULT_CAPTION,
    target_shape: tuple[int, int] = DEFAULT_TARGET_SHAPE,
    axcodes: str | None = None,
    spacing: float | tuple[float, float, float] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Prepare 2D axial slices and a datalist from registered 3D T1w (and FLAIR) NIfTI volumes.

    Args:
        input_dir: folder holding one subfolder per subject (UK Biobank layout).
        output_dir: where images/ and datalist.json go; must be empty or absent unless --overwrite.
        with_flair: also write each slice's FLAIR and pair it in the datalist ("flair" key).
        num_slices: axial slices per subject.
        slice_step: distance between chosen slices, in slices.
        slice_center: "volume" (middle z of the volume, default) or "mass" (intensity centre of mass along z).
        seed: seed of the subject split.
        val_fraction: fraction of subjects for validation.
        test_fraction: fraction of subjects for test.
        t1_pattern: glob of the T1w volumes, relative to input_dir.
        flair_pattern: glob of the FLAIR volumes, relative to input_dir.
        caption: caption stored with every slice.
        target_shape: in-plane size H,W after centre crop / zero pad.
        axcodes: reorient volumes to these axis codes first (e.g. RAS); default: as stored.
        spacing: resample volumes to this voxel size in mm first (one value, or three), e.g. 2 for the demo models
            (2 mm) or 1 for the full-size ones; default: voxels as stored.
        strict: with --with_flair, fail (instead of skipping) when a subject has no FLAIR.
        overwrite: replace images/ and datalist.json of a non-empty output_dir.
        progress: show a progress bar.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        result = prepare_brain_mri(
            str(input_dir),
            str(output_dir),
            with_flair=with_flair,
            t1_pattern=str(t1_pattern),
            flair_pattern=str(flair_pattern),
            num_slices=num_slices,
            slice_step=slice_step,
            slice_center=slice_center,
            target_shape=target_shape,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            caption=str(caption),
            axcodes=None if axcodes is None else str(axcodes),
            spacing=spacing,
            strict=strict,
            overwrite=overwrite,
            progress=progress,
        )
    except DataPreparationError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    counts = ", ".join(f"{split} {len(ids)}" for split, ids in result.splits.items())
    print(
        f"wrote {result.num_slices_written} slices of {sum(len(v) for v in result.splits.values())} subjects ({counts})"
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} subject(s): see the warnings above and datalist.json 'preparation'")
    print(f"datalist: {result.datalist_path}")


def cli() -> None:
    """Entry point of ``prepare-brain-mri``."""
    fire.Fire(main)


if __name__ == "__main__":
    cli()
