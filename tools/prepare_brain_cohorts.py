#!/usr/bin/env python
"""Prepare the healthy subjects of IXI, OASIS-1 or HCP Young Adult into 2D T1w slices with facts for captions.

Examples::

    prepare-brain-cohorts --cohort hcp --input_dir /data/HCP --demographics unrestricted_me_2024.csv \\
        --output_dir /data/hcp_slices --spacing 1
    prepare-brain-cohorts --cohort oasis1 --input_dir /data/OASIS1/disc1 --demographics oasis_cross-sectional.csv \\
        --output_dir /data/oasis_slices
    prepare-brain-cohorts --cohort ixi --input_dir /data/IXI_mni --demographics IXI.xls \\
        --t1_pattern '{subject}_T1_mni_brain.nii.gz' --output_dir /data/ixi_slices

Inputs must already be brain-extracted and registered (MNI152 1 mm; OASIS: its own T88 images): volumes off the
template grid are refused before anything is written, with the steps to register them. IXI's raw T1s are neither.
Output: ``<output_dir>/images/<subject>_slice-<k>_T1w.nii.gz`` (160x224, in [0, 1]) and ``datalist.json``
(training / validation / test, split by subject; each entry with ``facts``: cohort, subject, age, sex, ...).
Cohort layouts, the grid check and the registration commands: ``common/data/brain/cohorts.py``.
"""

from __future__ import annotations

import logging
import sys

import fire

from common.data.brain.cohorts import prepare_brain_cohort
from common.data.brain.mri_preparation import DEFAULT_CAPTION, DEFAULT_TARGET_SHAPE, DataPreparationError

_REASONS = {
    "not_healthy": "not healthy (CDR above 0)",
    "no_demographics": "without a demographics row",
    "repeat_session": "repeat session(s)",
}


def main(
    cohort: str,
    input_dir: str,
    demographics: str,
    output_dir: str,
    t1_pattern: str | None = None,
    template: str | None = None,
    grid_shape: tuple[int, int, int] | None = None,
    planes: str | tuple[str, ...] = "axial",
    num_slices: int = 5,
    slice_step: int = 1,
    slice_center: str = "volume",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    caption: str = DEFAULT_CAPTION,
    target_shape: tuple[int, int] = DEFAULT_TARGET_SHAPE,
    spacing: float | tuple[float, float, float] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Prepare 2D slices, facts and a datalist from one cohort's registered T1w volumes and demographics file.

    Args:
        cohort: ixi, oasis1 or hcp.
        input_dir: the cohort's folder (IXI: the registered volumes; OASIS-1: a disc folder holding OAS1_*_MR1/;
            HCP: the folder of subject folders).
        demographics: IXI.xls (or its CSV export), oasis_cross-sectional.csv, or HCP's unrestricted_*.csv.
        output_dir: where images/ and datalist.json go; must be empty or absent unless --overwrite.
        t1_pattern: path of the volumes relative to input_dir, {subject} where the subject is named; default: the
            cohort's own layout.
        template: grid the volumes must lie on, mni152 or t88; default: the cohort's (OASIS-1: t88).
        grid_shape: replace the template's voxel counts X,Y,Z.
        planes: comma-separated planes among axial, coronal, sagittal.
        num_slices: slices per subject and plane.
        slice_step: distance between chosen slices, in slices.
        slice_center: "volume" (middle of the volume, default) or "mass" (intensity centre of mass).
        seed: seed of the subject split.
        val_fraction: fraction of subjects for validation.
        test_fraction: fraction of subjects for test.
        caption: caption stored with every slice.
        target_shape: in-plane size H,W after centre crop / zero pad.
        spacing: resample volumes to this voxel size in mm first (HCP's 0.7 mm volumes need 1).
        strict: fail (instead of skipping) when a volume has no demographics row.
        overwrite: replace images/ and datalist.json of a non-empty output_dir.
        progress: show a progress bar.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        result = prepare_brain_cohort(
            str(cohort),
            str(input_dir),
            str(demographics),
            str(output_dir),
            t1_pattern=None if t1_pattern is None else str(t1_pattern),
            template=None if template is None else str(template),
            grid_shape=grid_shape,
            planes=planes,
            num_slices=num_slices,
            slice_step=slice_step,
            slice_center=slice_center,
            target_shape=target_shape,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            caption=str(caption),
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
    if left_out := [f"{n} {_REASONS[reason]}" for reason, n in result.excluded.items() if n]:
        print(f"left out: {', '.join(left_out)}; see the warnings above and datalist.json 'preparation'")
    print(f"datalist: {result.datalist_path}")


def cli() -> None:
    """Entry point of ``prepare-brain-cohorts``."""
    fire.Fire(main)


if __name__ == "__main__":
    cli()
