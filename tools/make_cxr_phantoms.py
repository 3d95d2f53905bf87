"""Generate the synthetic chest X-ray data set (frontal radiographs with reports, CheXpert labels and known facts).

Radiographs are drawn procedurally (``common/data/cxr/phantoms.py``; nothing is downloaded) and reported from their
facts (``common/data/cxr/reports.py``). Output: ``<output_dir>/images/*.png`` (8-bit grayscale) and
``<output_dir>/datalist.json`` (the layout of ``common/data/cxr/datalist.py``, split by patient).

Usage (from the repository root)::

    python tools/make_cxr_phantoms.py --output_dir data/cxr_phantoms --num_patients 500 --size demo --seed 0
    python tools/make_cxr_phantoms.py --output_dir data/cxr_phantoms_full --num_patients 50 --size full \\
        [--studies_per_patient 2] [--val_fraction 0.1] [--test_fraction 0.1] \\
        [--prevalence '{"pneumothorax": 0.3}'] [--overwrite]

``--size demo`` is 128 x 128, ``--size full`` 512 x 512, an integer any other square size (>= 32).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from common.data.cxr.phantoms import FINDINGS, FindingPrevalence, resolve_size, write_cxr_phantom_dataset

MIN_PATIENTS = 3  # one each for training, validation and test


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def make_cxr_phantoms(
    output_dir: str = "data/cxr_phantoms",
    num_patients: int = 500,
    size: str | int = "demo",
    seed: int = 0,
    studies_per_patient: int = 2,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    prevalence: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write ``num_patients * studies_per_patient`` phantom studies to ``output_dir``; returns the datalist path.

    ``prevalence`` overrides the default finding probabilities (:class:`FindingPrevalence`), e.g.
    ``{"pneumothorax": 0.3, "subtle": 0.1}``. Raises ``ValueError`` before writing anything for an unknown size,
    fewer than 3 patients, bad counts, fractions or prevalence, or a non-empty ``output_dir`` without
    ``overwrite``.
    """
    pixels = resolve_size(size)
    _integer("num_patients", num_patients, MIN_PATIENTS)
    _integer("studies_per_patient", studies_per_patient, 1)
    _integer("seed", seed, 0)
    if prevalence is not None and not isinstance(prevalence, dict):
        raise ValueError(f"prevalence must be a mapping such as '{{\"pneumothorax\": 0.3}}', got {prevalence!r}")
    odds = FindingPrevalence.from_mapping(prevalence)
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"output_dir {output} is not empty: pass --overwrite to replace its phantoms")

    start = time.perf_counter()
    datalist = write_cxr_phantom_dataset(
        output,
        num_patients=num_patients,
        size=pixels,
        seed=seed,
        studies_per_patient=studies_per_patient,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        prevalence=odds,
        progress=progress,
    )
    elapsed = time.perf_counter() - start
    _print_summary(datalist, pixels, elapsed)
    return str(datalist)


def _print_summary(datalist: Path, pixels: int, elapsed: float) -> None:
    import json

    data = json.loads(datalist.read_text())
    entries = [e for split in ("training", "validation", "test") for e in data[split]]
    shown = Counter(name for e in entries for name in e["facts"]["present"])
    normal = sum(1 for e in entries if e["labels"].get("No Finding") == 1.0)
    counts = ", ".join(f"{name} {shown[name]}" for name in FINDINGS)
    splits = ", ".join(f"{split} {len(data[split])}" for split in ("training", "validation", "test"))
    print(
        f"wrote {len(entries)} chest X-ray phantoms ({data['num_patients']} patients x {data['studies_per_patient']} "
        f"studies, {pixels}x{pixels}) in {elapsed:.1f} s; {splits}; shown: {counts}; no finding {normal}; "
        f"datalist: {datalist}"
    )


def main() -> None:
    import fire

    try:
        fire.Fire(make_cxr_phantoms, name="make_cxr_phantoms", serialize=lambda _: None)  # summary printed
    except ValueError as error:
        print(f"make_cxr_phantoms: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
