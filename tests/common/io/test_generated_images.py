"""common.io.generated_images: NIfTI + PNG + JSON sidecar per generated image."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from common.io.generated_images import GeneratedImageWriterd, slugify
from common.io.output_names import settings_digest

SIDECAR = {"bundle": "brain_t1_ldm", "version": "0.1.0", "num_inference_steps": 50, "guidance_scale": 7.0}

H, W = 12, 10


def _image(seed: int = 0) -> torch.Tensor:
    # values outside [0, 1] on purpose: the writer clamps
    return torch.rand((1, H, W), generator=torch.Generator().manual_seed(seed)) * 1.4 - 0.2


def _request(image, prompt="T1-weighted image of a brain.", seed=3, index=0):
    return {"pred": image, "prompt": prompt, "seed": seed, "index": index}


def _writer(tmp_path, **kwargs):
    return GeneratedImageWriterd(str(tmp_path / "out"), spacing=(0.5, 0.75), **{"sidecar": SIDECAR, **kwargs})


def _stem(prompt="T1-weighted image of a brain.", seed=3, sidecar=SIDECAR):
    return f"{slugify(prompt, max_len=48)}_seed{seed}_{settings_digest({'prompt': prompt, **sidecar, 'weights': {}})}"


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("T1-weighted image.", "t1-weighted_image"),
        ("T1-weighted image of a brain.", "t1-weighted_image_of_a_brain"),
        ("Chest X-ray: small LEFT effusion, no pneumothorax", "chest_x-ray_small_left_effusion_no_pneumothorax"),
        ("../../etc/passwd", "etc_passwd"),
        ("", "unconditional"),
        ("!!! ???", "unconditional"),
        ("Ödem im Großhirn", "dem_im_gro_hirn"),
    ],
)
def test_slugify(text, slug):
    assert slugify(text) == slug


def test_slugify_is_short_and_never_ends_with_underscore():
    slug = slugify("word " * 40)
    assert len(slug) <= 80 and not slug.endswith("_")
    assert slugify("abc def", max_len=4) == "abc"
    assert slugify("t1 weighted image of a brain", max_len=12) == "t1_weighted"  # cut at a word boundary


def test_writes_nifti_png_and_sidecar(tmp_path):
    image = _image()
    out = _writer(tmp_path)(_request(image))
    out_dir = tmp_path / "out"
    stem = _stem()
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{stem}.json", f"{stem}.nii.gz", f"{stem}.png"]
    assert out["output_files"] == [str(out_dir / f"{stem}.nii.gz"), str(out_dir / f"{stem}.png")]
    assert out["pred"] is image  # the input is passed on

    clamped = image.clamp(0, 1)[0].numpy()
    nifti = nib.load(out_dir / f"{stem}.nii.gz")
    assert nifti.header.get_zooms()[:2] == pytest.approx((0.5, 0.75))
    np.testing.assert_allclose(np.diag(nifti.affine)[:2], (0.5, 0.75))
    data = np.asarray(nifti.dataobj)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data.reshape(H, W), clamped)

    png = Image.open(out_dir / f"{stem}.png")
    assert png.mode == "L"  # 8-bit grey
    # MONAI's convention (as for the NIfTI): the first spatial axis is the image x axis (width).
    assert png.size == (H, W)
    pixels = np.asarray(png).T.astype(int)
    assert np.abs(pixels - clamped * 255).max() <= 1
    assert pixels.min() == 0 and pixels.max() == 255  # clamped values span the full 8-bit range

    sidecar = json.loads((out_dir / f"{stem}.json").read_text())
    assert sidecar == {
        **SIDECAR,
        "prompt": "T1-weighted image of a brain.",
        "seed": 3,
        "index": 0,
        "spacing_mm": [0.5, 0.75],
        "files": [f"{stem}.nii.gz", f"{stem}.png"],
    }


def test_png_reads_back_with_monai_in_the_same_orientation_as_the_nifti(tmp_path):
    from monai.transforms import LoadImage

    out = _writer(tmp_path)(_request(_image()))
    nifti_path, png_path = out["output_files"]
    from_nifti = np.asarray(LoadImage(image_only=True)(nifti_path)).squeeze()
    from_png = np.asarray(LoadImage(image_only=True)(png_path)).squeeze()
    assert from_png.shape == from_nifti.shape == (H, W)
    assert np.abs(from_png / 255.0 - from_nifti).max() <= 1 / 255 + 1e-6


def test_same_request_gives_byte_identical_files_and_is_refused_unless_overwrite(tmp_path):
    writer = _writer(tmp_path)
    writer(_request(_image()))
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite True"):
        writer(_request(_image(1)))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first
    _writer(tmp_path, overwrite=True)(_request(_image()))
    second = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert first == second


def test_existing_outputs_are_refused_at_construction_before_any_work(tmp_path):
    requests = [{"prompt": "T1-weighted image of a brain.", "seed": s, "index": s} for s in (3, 4)]
    _writer(tmp_path, requests=requests)(_request(_image(), seed=4))
    with pytest.raises(FileExistsError, match="1 output file|3 output file"):
        _writer(tmp_path, requests=requests)
    _writer(tmp_path, requests=requests, overwrite=True)  # asked for: accepted
    _writer(tmp_path, requests=requests[:1])  # seed 3 was never written


def test_nan_image_is_refused_and_nothing_written(tmp_path):
    image = _image()
    image[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _writer(tmp_path)(_request(image))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "T1-weighted image of a brain of a 70 year old subject with large ventricles, axial slice one"},
        {"sidecar": {**SIDECAR, "guidance_scale": 3.0}},
        {"sidecar": {**SIDECAR, "num_inference_steps": 20}},
    ],
)
def test_settings_that_change_the_image_change_the_name(tmp_path, change):
    base = "T1-weighted image of a brain of a 70 year old subject with large ventricles, axial slice two"
    prompt = change.get("prompt", base)
    a = _writer(tmp_path)(_request(_image(), prompt=base))["output_files"]
    b = _writer(tmp_path, **({"sidecar": change["sidecar"]} if "sidecar" in change else {}))
    b = b(_request(_image(), prompt=prompt))["output_files"]
    assert set(a).isdisjoint(b)


def test_tensor_request_values_become_plain_json(tmp_path):
    out = _writer(tmp_path)(_request(_image(), seed=torch.tensor(7), index=torch.tensor([2])))
    assert out["output_files"][0].endswith(f"{_stem(seed=7)}.nii.gz")
    sidecar = json.loads((tmp_path / "out" / f"{_stem(seed=7)}.json").read_text())
    assert sidecar["seed"] == 7 and sidecar["index"] == 2


def test_different_seeds_and_prompts_get_different_names(tmp_path):
    writer = _writer(tmp_path)
    names = {tuple(writer(_request(_image(), prompt=p, seed=s))["output_files"]) for p in ("a", "b") for s in (0, 1)}
    assert len(names) == 4


def test_unconditional_prompt_name(tmp_path):
    out = _writer(tmp_path)(_request(_image(), prompt=""))
    assert out["output_files"][0].endswith(f"{_stem(prompt='')}.nii.gz")
    assert "/unconditional_seed3_" in out["output_files"][0]


@pytest.mark.parametrize("shape", [(H, W), (2, H, W), (1, 1, H, W), (3, H, W)])
def test_wrong_shape_raises_and_writes_nothing(tmp_path, shape):
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        _writer(tmp_path)(_request(torch.zeros(shape)))
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_numpy_image_is_accepted(tmp_path):
    out = _writer(tmp_path, formats=("png",))(_request(_image().numpy()))
    assert [p.split("/")[-1] for p in out["output_files"]] == [f"{_stem()}.png"]


def test_png_only(tmp_path):
    _writer(tmp_path, formats=("png",))(_request(_image()))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"{_stem()}.json", f"{_stem()}.png"]
    sidecar = json.loads((tmp_path / "out" / names[0]).read_text())
    assert sidecar["files"] == [f"{_stem()}.png"]


def test_unknown_format_rejected(tmp_path):
    with pytest.raises(ValueError, match="jpg"):
        _writer(tmp_path, formats=("png", "jpg"))


def test_no_temporary_files_left_behind(tmp_path):
    writer = _writer(tmp_path)
    for seed in range(2):
        writer(_request(_image(seed), seed=seed))
    everything = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*"))
    assert all(not name.startswith(".") and "/" not in name for name in everything)
    assert len(everything) == 6


def test_16bit_png_keeps_what_8_bits_round_away(tmp_path):
    image = torch.linspace(0, 1, H * W).reshape(1, H, W)
    out = _writer(tmp_path, formats=("png", "png16"))(_request(image))
    png8, png16 = (Image.open(p) for p in out["output_files"])
    assert out["output_files"][1].endswith("_16bit.png")
    assert (png8.mode, png16.mode) == ("L", "I;16")
    deep = np.asarray(png16).T.astype(float) / 65535
    assert np.abs(deep - image[0].numpy()).max() <= 1 / 65535 + 1e-6
    assert np.abs(np.asarray(png8).T / 255 - image[0].numpy()).max() > 1e-3  # 8 bits lose precision


@pytest.mark.parametrize("formats", [("tiff",), ()])
def test_unknown_or_no_format_is_refused(tmp_path, formats):
    with pytest.raises(ValueError, match="png16"):
        _writer(tmp_path, formats=formats)
