"""Small stand-ins for tests: NIfTI and raw files, and the part of an Ignite engine handlers read."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def write_nifti(path: Path, array, affine=None) -> Path:
    """A float32 NIfTI (default affine: 2 x 2 x 3 mm) with a recognisable header description."""
    image = nib.Nifti1Image(
        np.asarray(array, dtype=np.float32), np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    )
    image.header["descrip"] = b"test volume"
    nib.save(image, str(path))
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class FakeEngine:
    """The part of an Ignite engine that handlers read: decollated batch and output of one iteration."""

    def __init__(self, batch, output):
        self.state = type("S", (), {"batch": batch, "output": output})()
