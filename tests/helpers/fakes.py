"""Small stand-ins for tests: NIfTI and raw files, the part of an Ignite engine handlers read, evaluation results."""

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


def generation_results(**extra) -> dict:
    """The unconditional part of a ``LatentDiffusionEvaluation`` result, plus ``extra`` (adherence, captioned)."""
    return {
        "metrics": {
            "reconstruction_ms_ssim_test": 0.97,
            "sample_diversity_ms_ssim": 0.4,
            "real_diversity_ms_ssim_test": 0.41,
            "fid": 3.0,
        },
        "std": {"sample_diversity_ms_ssim": 0.01, "real_diversity_ms_ssim_test": 0.02},
        "num_real_test_images": 100,
        "num_generated_samples": 100,
        "guidance_scale": 0.0,
        "num_inference_steps": 50,
        "scheduler": "ddim",
        "fid_features": "phantom feature network",
        "command": "python -m monai.bundle run ...",
        **extra,
    }
