"""The MONAI Label app for real: ``monailabel start_server`` on 127.0.0.1 with a studies folder the test writes,
the REST ``/info`` and ``/infer`` endpoints called with an HTTP client, the server stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.helpers import REPO_ROOT

APP = REPO_ROOT / "tools" / "monailabel_app"
EXAMPLE = REPO_ROOT / "bundles" / "flair_to_t1_controlnet" / "examples" / "sub-0011_slice-2_FLAIR.nii.gz"
FAST = {"num_inference_steps": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A running server on a studies folder holding a FLAIR volume (two slices); yields its URL and the folder."""
    studies = tmp_path_factory.mktemp("studies")
    slice_ = nib.load(EXAMPLE)
    data = np.asarray(slice_.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, data[::-1]], axis=-1), slice_.affine), studies / "flair_case.nii.gz")
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its python
    log = (studies.parent / "server.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=studies.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"The server did not start: {(studies.parent / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, studies
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def test_info_lists_one_task_per_declared_bundle_with_its_options(server):
    url, _ = server
    models = httpx.get(f"{url}/info/", timeout=30).json()["models"]
    assert set(models) == {"flair_to_t1", "text_to_t1", "text_to_brain_unclip", "text_to_cxr"}
    assert models["flair_to_t1"]["config"] == {"seed": 0, "num_inference_steps": 50, "guidance_scale": 1.0}
    assert "prompt" in models["text_to_cxr"]["config"]


def test_flair_volume_in_gives_a_t1w_volume_with_its_geometry(server, tmp_path):
    url, studies = server
    response = httpx.post(
        f"{url}/infer/flair_to_t1",
        params={"image": "flair_case", "output": "image"},
        data={"params": json.dumps({**FAST, "seed": 3})},
        timeout=300,
    )
    assert response.status_code == 200, response.text[:2000]
    result = tmp_path / "t1.nii.gz"
    result.write_bytes(response.content)
    t1, flair = nib.load(result), nib.load(studies / "flair_case.nii.gz")
    assert t1.shape == flair.shape == (80, 112, 2)
    np.testing.assert_allclose(t1.affine, flair.affine)
    assert not np.allclose(np.asarray(t1.dataobj), np.asarray(flair.dataobj)), "a translation, not the input"


def test_text_request_adds_generated_images_to_the_datastore_with_their_sidecar(server):
    url, studies = server
    prompt = "T1-weighted image of a brain of a 80 year old subject with large ventricles."
    response = httpx.post(
        f"{url}/infer/text_to_t1",
        params={"image": "flair_case", "output": "json"},
        data={"params": json.dumps({**FAST, "prompt": prompt, "num_samples": 2, "seed": 5})},
        timeout=300,
    )
    assert response.status_code == 200, response.text[:2000]
    added = response.json()["added_images"]
    assert len(added) == 2 and all((studies / f"{image_id}.nii.gz").is_file() for image_id in added)
    datastore = httpx.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    info = datastore["objects"][added[0]]["image"]["info"]
    assert info["generated_by"] == "brain_t1_ldm" and info["prompt"] == prompt and info["seed"] == 5


def test_bad_requests_are_refused_with_their_reason(server, tmp_path):
    url, _ = server
    response = httpx.post(
        f"{url}/infer/flair_to_t1",
        params={"image": "flair_case", "output": "image"},
        data={"params": json.dumps({"num_inference_steps": -3})},
        timeout=300,
    )
    assert response.status_code == 422
    assert "--num_inference_steps -3" in response.json()["detail"]
    # an image the bundle refuses (another size): the bundle's own message reaches the client
    _, studies = server
    nib.save(
        nib.Nifti1Image(np.zeros((64, 64, 2), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), studies / "small.nii.gz"
    )
    deadline = time.monotonic() + 60
    while "small" not in httpx.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]:
        assert time.monotonic() < deadline, "the datastore did not pick up the new image"
        time.sleep(1)
    response = httpx.post(
        f"{url}/infer/flair_to_t1", params={"image": "small", "output": "image"}, data={"params": "{}"}, timeout=300
    )
    assert response.status_code == 422 and "but the model expects (80, 112)" in response.json()["detail"]
