"""The text-to-image MONAI Deploy application, run in-process on CPU: a request JSON in, images and DICOM out."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from tools.deploy_apps.text_to_image.app import STATEMENT, TextToImageApp

FAST = {"num_inference_steps": 2}


@pytest.mark.parametrize(
    ("bundle", "prompt", "orientation"),
    [
        ("brain_t1_ldm", "T1-weighted image of a brain of a 70 year old subject with large ventricles.", ["R", "A"]),
        ("cxr_ldm", "Small left pleural effusion.", ["L", "F"]),
        ("brain_unclip", "T1-weighted brain MRI, axial slice at z=+13 mm, 70-year-old subject", ["R", "A"]),
    ],
)
def test_a_request_gives_images_and_secondary_capture_objects(bundle, prompt, orientation, tmp_path):
    request = tmp_path / "request.json"
    patient = {"id": "SYN-0001", "name": "SYNTHETIC^TEST"}
    request.write_text(
        json.dumps({"bundle": bundle, "prompt": prompt, "num_samples": 2, "seed": 3, "patient": patient})
    )
    out = tmp_path / "out"
    overrides = {**FAST, "prior_num_inference_steps": 2} if bundle == "brain_unclip" else FAST
    TextToImageApp(["app", "-i", str(request), "-o", str(out)], overrides=overrides).run()

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and len(list(out.glob("*.json"))) == 2
    (series,) = (out / "dicom").iterdir()
    objects = [pydicom.dcmread(p) for p in sorted(series.glob("*.dcm"))]
    assert len(objects) == 2
    assert objects[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert len({o.StudyInstanceUID for o in objects}) == len({o.SeriesInstanceUID for o in objects}) == 1
    for png, instance in zip(pngs, objects, strict=True):
        assert (instance.pixel_array == np.asarray(Image.open(png).convert("L"))).all()
        assert instance.PatientID == "SYN-0001" and str(instance.PatientName) == "SYNTHETIC^TEST"
        assert instance.ImageComments.startswith(STATEMENT) and prompt in instance.ImageComments
        assert "SYNTHETIC" in instance.SeriesDescription and list(instance.PatientOrientation) == orientation
    assert {int(o.ImageComments.rsplit("Seed: ", 1)[1]) for o in objects} == {3, 4}


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"bundle": "flair_to_t1_controlnet", "prompt": "x"}, "Unknown bundle 'flair_to_t1_controlnet'"),
        ({"num_samples": 2}, 'must be a JSON object with a "prompt"'),
        ({"prompt": "a brain", "patient": "Jane"}, '"patient"'),
    ],
)
def test_bad_requests_are_refused_before_any_work(request_body, message, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(request_body))
    with pytest.raises(ValueError, match=message):
        TextToImageApp(["app", "-i", str(request), "-o", str(tmp_path / "out")]).run()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
