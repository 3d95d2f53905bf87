"""tools.release.package (package-bundles): reproducible zoo zips vendoring the modules they use, the index, and a bundle
downloaded over HTTP with ``monai.bundle download`` that runs with the repository out of sight."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

import common
from tests.helpers.bundle_copy import REPO_ROOT, copy_bundle, edit_json
from tools.release.package import PackagingError, package_bundles

NAME = "brain_t1_ldm"
BUNDLE = REPO_ROOT / "bundles" / NAME
VERSION = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
ZIP_NAME = f"{NAME}_v{VERSION}.zip"
BASE_URL = "https://example.org/bundles"
PY = sys.executable


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    package_bundles(bundles=NAME, output_dir=str(out), base_url=BASE_URL)
    return out


def test_two_builds_are_byte_identical(dist, tmp_path):
    package_bundles(bundles=[NAME], output_dir=str(tmp_path), base_url=BASE_URL)
    assert (tmp_path / ZIP_NAME).read_bytes() == (dist / ZIP_NAME).read_bytes()
    assert (tmp_path / "model_info.json").read_bytes() == (dist / "model_info.json").read_bytes()


def test_index_in_the_zoo_shape(dist):
    index = json.loads((dist / "model_info.json").read_text())
    assert index == {f"{NAME}_v{VERSION}": {"checksum": _sha256(dist / ZIP_NAME), "source": f"{BASE_URL}/{ZIP_NAME}"}}


def test_zip_layout_and_vendored_common(dist):
    with zipfile.ZipFile(dist / ZIP_NAME) as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert all(n.startswith(f"{NAME}/") for n in names), "one top folder named after the bundle"
        for required in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE"):
            assert f"{NAME}/{required}" in names
        assert f"{NAME}/large_files.yml" in names and f"{NAME}/models/autoencoder.pt" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or f"{NAME}/runs/" in n]
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        modes = {i.external_attr >> 16 for i in infos}
        assert modes == {0o100644, 0o40755}, "fixed permissions, no symbolic links"
        # common/ holds real copies of the modules the bundle's configs use, and records what it carries
        vendored = {n.removeprefix(f"{NAME}/common/") for n in names if n.startswith(f"{NAME}/common/")}
        files = {n for n in vendored if n and not n.endswith("/")}
        record = json.loads(archive.read(f"{NAME}/common/VENDORED.json"))
        assert record["version"] == common.__version__
        assert (
            "common.io.generated_images" in record["modules"]
            and "common.data.brain.mri_preparation" not in record["modules"]
        )
        expected = {str(Path(*m.split(".")[1:])) + ".py" for m in record["modules"] if m.count(".")}
        assert {f for f in files if not f.endswith(("__init__.py", "VENDORED.json"))} == {
            e for e in expected if (REPO_ROOT / "common" / e).is_file()
        }
        assert "data/brain/mri_preparation.py" not in files and "evaluation/translation.py" not in files
        for name in files - {"VENDORED.json"}:
            assert archive.read(f"{NAME}/common/{name}") == (REPO_ROOT / "common" / name).read_bytes()
        assert archive.read(f"{NAME}/configs/metadata.json") == (BUNDLE / "configs" / "metadata.json").read_bytes()


def test_refuses_a_version_missing_from_the_changelog(tmp_path):
    bundle = copy_bundle(tmp_path / "bundles", models=False)
    edit_json(bundle / "configs" / "metadata.json", lambda m: m.update(version="0.9.0"))
    out = tmp_path / "dist"
    with pytest.raises(PackagingError) as info:
        package_bundles(bundles_dir=str(tmp_path / "bundles"), output_dir=str(out))
    message = str(info.value)
    assert NAME in message and "'0.9.0'" in message and "changelog" in message
    assert not out.exists() or not any(out.iterdir()), "nothing is written for a refused bundle"
    done = subprocess.run(
        [PY, "tools/package_bundles.py", "--bundles_dir", str(tmp_path / "bundles"), "--output_dir", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "changelog" in done.stderr and NAME in done.stderr


def test_refuses_shipped_weights_that_do_not_belong_together(tmp_path):
    """A diffusion model beside an autoencoder it was not trained with is not released."""
    bundle = copy_bundle(tmp_path / "bundles")
    path = bundle / "models" / "autoencoder.pt"
    weights = torch.load(path, weights_only=True)
    key = next(k for k in weights["autoencoder"] if k.startswith("encoder."))
    weights["autoencoder"][key] = weights["autoencoder"][key] + 0.01
    torch.save(weights, path)
    with pytest.raises(PackagingError, match="diffusion_model.pt was trained with another autoencoder"):
        package_bundles(bundles_dir=str(tmp_path / "bundles"), output_dir=str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()


def test_refuses_a_distilled_model_beside_another_teacher(tmp_path):
    """A guidance-distilled UNet beside a diffusion model it was not distilled from is not released."""
    bundle = copy_bundle(tmp_path / "bundles")
    teacher = torch.load(bundle / "models" / "diffusion_model.pt", weights_only=True)
    student = {**teacher, "guidance_distillation": {"guidance_scale": 3.0, "teacher": "0" * 64}}
    torch.save(student, bundle / "models" / "diffusion_model_distilled.pt")
    with pytest.raises(PackagingError, match="diffusion_model_distilled.pt was distilled from another diffusion model"):
        package_bundles(bundles_dir=str(tmp_path / "bundles"), output_dir=str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()


def test_large_files_present_locally_are_packed_and_checked(tmp_path):
    bundle = copy_bundle(tmp_path / "bundles", models=False)
    (bundle / "models" / "full_size").mkdir(parents=True)
    weights = bundle / "models" / "full_size" / "autoencoder.pt"
    weights.write_bytes(b"pretend weights")
    config = yaml.safe_load((bundle / "large_files.yml").read_text())
    config["large_files"][0]["hash_val"] = hashlib.sha256(b"pretend weights").hexdigest()
    (bundle / "large_files.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / "dist"
    package_bundles(bundles_dir=str(tmp_path / "bundles"), output_dir=str(out))
    with zipfile.ZipFile(out / ZIP_NAME) as archive:
        assert archive.read(f"{NAME}/models/full_size/autoencoder.pt") == b"pretend weights"
        assert f"{NAME}/models/full_size/diffusion_model.pt" not in archive.namelist(), "absent: stays listed"
        assert yaml.safe_load(archive.read(f"{NAME}/large_files.yml")) == config
    weights.write_bytes(b"tampered")
    with pytest.raises(PackagingError, match=r"models/full_size/autoencoder.pt: sha256 mismatch"):
        package_bundles(bundles_dir=str(tmp_path / "bundles"), output_dir=str(out))


def test_git_ignored_files_and_local_folders_stay_out(tmp_path):
    bundle = copy_bundle(tmp_path / "bundles", models=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    (tmp_path / ".gitignore").write_text("*.log\nscratch/\n")
    (bundle / "docs" / "train.log").write_text("local log")
    (bundle / "scratch").mkdir()
    (bundle / "scratch" / "notes.txt").write_text("local notes")
    for folder in ("runs", "data", "output"):
        (bundle / folder).mkdir()
        (bundle / folder / "x.txt").write_text("local")
    (bundle / "configs" / "__pycache__").mkdir()
    (bundle / "configs" / "__pycache__" / "x.pyc").write_bytes(b"")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "-m", "bundle"], check=True, timeout=60)
    package_bundles(bundles_dir=str(tmp_path / "bundles"), output_dir=str(tmp_path / "dist"))
    with zipfile.ZipFile(tmp_path / "dist" / ZIP_NAME) as archive:
        names = archive.namelist()
    assert f"{NAME}/docs/README.md" in names and f"{NAME}/common/io/atomic.py" in names

    # a stray file (the README example's OUT/, notes) is refused, not shipped
    (bundle / "OUT").mkdir()
    (bundle / "OUT" / "sample.png").write_bytes(b"png")
    with pytest.raises(PackagingError, match=r"1 file\(s\) that git does not track.*OUT/sample\.png.*\.gitignore"):
        package_bundles(bundles_dir=str(tmp_path / "bundles"), output_dir=str(tmp_path / "dist2"))
    assert not (tmp_path / "dist2").exists()
    for left_out in ("docs/train.log", "scratch/", "runs/", "data/", "output/", "configs/__pycache__/"):
        assert not [n for n in names if n.startswith(f"{NAME}/{left_out}")], left_out


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) in a thread; stopped and closed on exit."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # quiet
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 30
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _outside_env() -> dict[str, str]:
    """The environment of a user who has only the downloaded bundle: no PYTHONPATH, no proxy for localhost."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", HF_HUB_OFFLINE="1")
    return env


def test_downloaded_bundle_runs_with_the_repository_out_of_sight(dist, tmp_path):
    assert not tmp_path.is_relative_to(REPO_ROOT)
    downloads = tmp_path / "downloads"
    env = _outside_env()
    with serve(dist) as url:
        index = json.loads(urlopen_text(f"{url}/model_info.json"))
        done = subprocess.run(
            [PY, "-m", "monai.bundle", "download", "--name", NAME, "--url", f"{url}/{ZIP_NAME}"]
            + ["--bundle_dir", str(downloads), "--progress", "False"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert _sha256(downloads / f"{NAME}.zip") == index[f"{NAME}_v{VERSION}"]["checksum"]
    folder = downloads / NAME
    assert (folder / "configs" / "inference.json").is_file() and not (folder / "common").is_symlink()

    # The repository is installed in this environment (editable, for development): hide it, as on a user's machine,
    # so that a module the zip lacks fails the run instead of being found in the repository.
    run_alone = (
        "import runpy, sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
        "sys.argv[0] = 'monai.bundle'; runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)"
    )
    out = tmp_path / "generated"
    run = subprocess.run(
        [PY, "-c", run_alone, "run", "--config_file", "configs/inference.json", "--num_samples", "1"]
        + ["--num_inference_steps", "2", "--progress", "False", "--output_dir", str(out)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    written = sorted(p.name for p in out.iterdir())
    assert (
        len(written) == 3 and any(n.endswith(".nii.gz") for n in written) and any(n.endswith(".png") for n in written)
    )
    sidecar = json.loads(next(p for p in out.iterdir() if p.suffix == ".json").read_text())
    assert sidecar["bundle"] == NAME and sidecar["version"] == VERSION
    assert sidecar["common_version"] == json.loads((folder / "common" / "VENDORED.json").read_text())["version"]


def urlopen_text(url: str) -> str:
    """GET ``url`` without any proxy (the test server is local)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        return response.read().decode()
