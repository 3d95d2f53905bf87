"""common.bundle.runner: a bundle's inference run as a function, as MONAI Label and Deploy will call it."""

from __future__ import annotations

import json

import pytest

from common.bundle.options import BundleOptionError
from common.bundle.runner import SharedPackageVersionError, bundle_shared_version, check_shared_package, run_bundle
from tests.helpers import REPO_ROOT
from tests.helpers.bundle_runs import snapshot

pytestmark = pytest.mark.bundle

BRAIN = REPO_ROOT / "bundles" / "brain_t1_ldm"
CONTROLNET = REPO_ROOT / "bundles" / "flair_to_t1_controlnet"
FAST = {"num_inference_steps": 2, "progress": False}


def test_two_bundles_served_from_one_process_write_their_outputs_and_change_no_bundle_file(tmp_path):
    before = {b: snapshot(b / "configs") for b in (BRAIN, CONTROLNET)}
    prompt = "T1-weighted image of a brain of a 80 year old subject with large ventricles."
    generated = run_bundle(BRAIN, tmp_path / "a", {"prompt": prompt, "num_samples": 2, "seed": 4, **FAST})
    assert sorted(p.suffix for p in generated.files) == [".gz", ".gz", ".png", ".png"]
    assert [s["prompt"] for s in generated.sidecars] == [prompt, prompt]
    assert {s["seed"] for s in generated.sidecars} == {4, 5}
    example = CONTROLNET / "examples" / "sub-0011_slice-2_FLAIR.nii.gz"
    translated = run_bundle(CONTROLNET, tmp_path / "b", {"input_image": str(example), **FAST})
    assert [p.name.split("_seed0_")[0] for p in translated.files] == ["sub-0011_slice-2_FLAIR_T1w"] * 2
    assert translated.sidecars[0]["input_image"] == str(example)
    again = run_bundle(BRAIN, tmp_path / "c", {"prompt": prompt, "num_samples": 2, "seed": 4, **FAST})
    assert again.files[0].read_bytes() == generated.files[0].read_bytes()  # same request, same bytes
    assert {b: snapshot(b / "configs") for b in (BRAIN, CONTROLNET)} == before


def test_bad_overrides_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(BundleOptionError, match="--promt: no such option.*Did you mean --prompt"):
        run_bundle(BRAIN, tmp_path / "out", {"promt": "x"})
    with pytest.raises(BundleOptionError, match="--guidance_scale nan"):
        run_bundle(CONTROLNET, tmp_path / "out", {"guidance_scale": float("nan")})
    assert not (tmp_path / "out").exists()


def test_a_bundle_carrying_another_common_version_is_refused_with_both_versions(tmp_path):
    import common

    bundle = tmp_path / "downloaded"
    (bundle / "common").mkdir(parents=True)
    (bundle / "common" / "VENDORED.json").write_text(json.dumps({"package": "common", "version": "9.9.9"}))
    assert bundle_shared_version(bundle) == "9.9.9"
    with pytest.raises(SharedPackageVersionError, match=rf"carries common 9.9.9.*loaded common {common.__version__}"):
        check_shared_package(bundle)
    (bundle / "common" / "VENDORED.json").unlink()
    (bundle / "common" / "__init__.py").write_text(f'__version__ = "{common.__version__}"\n')
    check_shared_package(bundle)  # the same version is fine
    assert bundle_shared_version(BRAIN) == common.__version__  # the repository's bundles link to this common


def test_every_shipped_bundle_runs_through_the_runner_without_code_of_its_own(tmp_path):
    """The adapter needs no code per bundle: the text-to-image bundles take a prompt, brain_unclip also a slice."""
    unclip = REPO_ROOT / "bundles" / "brain_unclip"
    fast = {**FAST, "num_samples": 1}
    chest = run_bundle(
        REPO_ROOT / "bundles" / "cxr_ldm", tmp_path / "cxr", {"prompt": "Small left pleural effusion.", **fast}
    )
    assert len(chest.sidecars) == 1 and chest.sidecars[0]["prompt"] == "Small left pleural effusion."
    text = run_bundle(unclip, tmp_path / "text", {**fast, "prior_num_inference_steps": 2})
    assert text.sidecars[0]["mode"] == "text" and text.sidecars[0]["requested_facts"]["ventricle_size"] == "large"
    example = CONTROLNET / "examples" / "sub-0011_slice-2_T1w.nii.gz"
    variations = run_bundle(unclip, tmp_path / "variations", {**fast, "input_image": str(example)})
    assert variations.sidecars[0]["mode"] == "variation" and variations.sidecars[0]["source"] == str(example)


def test_outputs_pair_each_written_file_with_its_sidecar(tmp_path):
    from common.bundle.runner import BundleRun

    run = BundleRun(
        tmp_path,
        files=[tmp_path / n for n in ("a.json", "a.nii.gz", "a.png", "b.json", "b.nii.gz", "b.png")],
        sidecars=[{"seed": 0, "files": ["a.nii.gz", "a.png"]}, {"seed": 1, "files": ["b.nii.gz", "b.png"]}],
    )
    assert [(p.name, s["seed"]) for p, s in run.outputs(".nii.gz")] == [("a.nii.gz", 0), ("b.nii.gz", 1)]
    assert [(p.name, s["seed"]) for p, s in run.outputs(".png")] == [("a.png", 0), ("b.png", 1)]
    with pytest.raises(ValueError, match="wrote no .dcm file"):
        run.outputs(".dcm")
