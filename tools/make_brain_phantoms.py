"""Generate the synthetic brain MRI data set (T1w + FLAIR axial slices, captions, ground truth).

Subjects are built from the MNI152 2009 templates that ship inside nilearn (nothing is downloaded); see
``common/data/brain_phantoms.py`` for the model. Output: ``<output_dir>/images/*.nii.gz`` (2D NIfTI per slice
and contrast) and ``<output_dir>/datalist.json`` (MONAI decathlon style, split by subject).

Usage (from the repository root)::

    python tools/make_brain_phantoms.py --output_dir data/brain_phantoms --num_subjects 200 --size demo --seed 0
    python tools/make_brain_phantoms.py --output_dir data/brain_phantoms_full --num_subjects 20 --size full \\
        [--num_slices 5] [--slice_step 1] [--val_fraction 0.1] [--test_fraction 0.1] [--overwrite] \\
        [--intensity ukbiobank] [--extra_training_subjects 0]

``--size demo`` is 80 x 112 at 2 mm, ``--size full`` 160 x 224 at 1 mm. ``--intensity ukbiobank`` (default)
renders bias-field corrected images with an age-dependent T1w contrast, as UK Biobank's preprocessing gives;
``--intensity uncorrected`` rebuilds the data sets written before that model (strong bias fields, wide contrast
spread). ``--extra_training_subjects N`` adds N training-only subjects and keeps the validation and test splits of
the data set made without them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common.data.brain.phantoms import PhantomGeometry, intensity_model, write_phantom_dataset

SIZES = {"demo": PhantomGeometry.demo, "full": PhantomGeometry.full}
MIN_SUBJECTS = 3  # one each for training, validation and test


def make_brain_phantoms(
    output_dir: str = "data/brain_phantoms",
    num_subjects: int = 200,
    size: str = "demo",
    seed: int = 0,
    num_slices: int = 5,
    slice_step: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    overwrite: bool = False,
    progress: bool = True,
    intensity: str = "ukbiobank",
    extra_training_subjects: int = 0,
) -> str:
    """Write ``num_subjects`` phantom subjects (``num_slices`` slices each) to ``output_dir``; returns the datalist path.

    ``extra_training_subjects`` adds that many training-only subjects: the validation and test splits (and every
    image of the first ``num_subjects``) stay those of the data set made without them, so models trained on the
    larger set are compared on the same test split.

    Raises ``ValueError`` before writing anything for an unknown ``size`` or ``intensity``, fewer than 3 subjects,
    bad slice settings, or a non-empty ``output_dir`` without ``overwrite``.
    """
    if str(size) not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    intensity_model(str(intensity))
    if isinstance(num_subjects, bool) or not isinstance(num_subjects, int) or num_subjects < MIN_SUBJECTS:
        raise ValueError(
            f"num_subjects must be an integer >= {MIN_SUBJECTS} (training, validation and test each need a "
            f"subject), got {num_subjects!r}"
        )
    minimum = {"num_slices": 1, "slice_step": 1, "seed": 0, "extra_training_subjects": 0}
    values = {"num_slices": num_slices, "slice_step": slice_step, "seed": seed}
    values["extra_training_subjects"] = extra_training_subjects
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum[name]:
            raise ValueError(f"{name} must be an integer >= {minimum[name]}, got {value!r}")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"output_dir {output} is not empty: pass --overwrite to replace its phantoms")
    geometry = SIZES[str(size)](num_slices=num_slices, slice_step=slice_step)

    start = time.perf_counter()
    datalist = write_phantom_dataset(
        output,
        num_subjects=num_subjects,
        geometry=geometry,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        progress=progress,
        intensity=str(intensity),
        extra_training_subjects=extra_training_subjects,
    )
    elapsed = time.perf_counter() - start
    total = num_subjects + extra_training_subjects
    num = total * geometry.num_slices
    extra = f", {extra_training_subjects} of them training-only" if extra_training_subjects else ""
    print(
        f"wrote {num} slices ({total} subjects x {geometry.num_slices}{extra}, T1w + FLAIR, "
        f"{geometry.slice_shape[0]}x{geometry.slice_shape[1]} at {geometry.spacing_mm:g} mm, {intensity} intensities) "
        f"in {elapsed:.1f} s; datalist: {datalist}"
    )
    return str(datalist)


def main() -> None:
    import fire

    try:
        fire.Fire(make_brain_phantoms, name="make_brain_phantoms", serialize=lambda _: None)  # summary printed
    except ValueError as error:
        print(f"make_brain_phantoms: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
