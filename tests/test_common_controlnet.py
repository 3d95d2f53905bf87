"""common.controlnet, common.condition_images and common.translation_evaluation on tiny networks and files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import PILWriter
from monai.networks.nets import ControlNet

from common.condition_images import TranslatedImageWriter, load_condition_image, to_unit_range, translation_requests
from common.controlnet import (
    BaseModelRecord,
    ControlNetGuidedSampler,
    ControlNetPrepareBatch,
    ControlNetTrainingInferer,
    controlnet_from_unet,
    freeze,
    load_controlnet,
    unet_fingerprint,
)
from common.latent import SchedulerSettings
from common.translation_evaluation import PairedImageMetrics, TranslationReport
from tests.conftest import CONTEXT_DIM, IMAGE_SIZE, LATENT_CHANNELS, make_unet

LATENT = (LATENT_CHANNELS, IMAGE_SIZE[0] // 2, IMAGE_SIZE[1] // 2)


def make_controlnet(channels=(8, 8), embedding=(4, 8)) -> ControlNet:
    """ControlNet matching ``make_unet`` (its embedding downsamples x2, like the tiny autoencoder)."""
    torch.manual_seed(1)
    return ControlNet(
        spatial_dims=2,
        in_channels=LATENT_CHANNELS,
        channels=channels,
        num_res_blocks=1,
        attention_levels=(False, True),
        num_head_channels=(0, 8),
        with_conditioning=True,
        cross_attention_dim=CONTEXT_DIM,
        norm_num_groups=8,
        conditioning_embedding_in_channels=1,
        conditioning_embedding_num_channels=embedding,
    )


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *LATENT, generator=g),
        torch.randn(batch, 77, CONTEXT_DIM, generator=g),
        torch.rand(batch, 1, *IMAGE_SIZE, generator=g),
    )


def test_controlnet_from_unet_copies_encoder_and_starts_as_identity():
    unet = make_unet()
    controlnet = controlnet_from_unet(make_controlnet(), unet.state_dict())
    for name, value in controlnet.state_dict().items():
        if name.startswith(("conv_in.", "down_blocks.", "middle_block.")):
            assert torch.equal(value, unet.state_dict()[name]), name
    latents, context, cond = _inputs()
    t = torch.tensor([10, 500])
    down, mid = controlnet(latents, t, controlnet_cond=cond, context=context)
    # Zero convolutions: a fresh ControlNet adds nothing, so the pair predicts exactly what the UNet does.
    with_control = unet(
        latents, t, context=context, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )
    assert torch.allclose(with_control, unet(latents, t, context=context))


def test_controlnet_from_unet_rejects_mismatched_architecture():
    with pytest.raises(ValueError, match="does not match the base UNet"):
        controlnet_from_unet(make_controlnet(channels=(16, 16)), make_unet().state_dict())


def test_unet_fingerprint_tracks_values_not_storage():
    state = make_unet().state_dict()
    copy = {k: v.clone() for k, v in reversed(list(state.items()))}
    assert unet_fingerprint(copy) == unet_fingerprint(state)
    name = next(iter(copy))
    copy[name] = copy[name] + 1e-6
    assert unet_fingerprint(copy) != unet_fingerprint(state)


def test_load_controlnet_refuses_weights_of_another_base(tmp_path, caplog):
    unet_state = make_unet().state_dict()
    trained = controlnet_from_unet(make_controlnet(), unet_state)
    path = tmp_path / "controlnet.pt"
    torch.save({"controlnet": trained.state_dict(), "base_model": BaseModelRecord(unet_state).state_dict()}, path)

    loaded = load_controlnet(make_controlnet(), str(path), unet_state)
    torch.testing.assert_close(loaded.state_dict(), trained.state_dict())

    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in unet_state.items()}
    with pytest.raises(ValueError, match="trained against another base UNet.*--controlnet_init_path"):
        load_controlnet(make_controlnet(), str(path), other)

    foreign = tmp_path / "diffusion_model.pt"
    torch.save({"unet": unet_state}, foreign)
    with pytest.raises(ValueError, match="has no 'controlnet' entry"):
        load_controlnet(make_controlnet(), str(foreign), unet_state)

    torch.save({"controlnet": trained.state_dict()}, path)  # older export without the record
    with caplog.at_level("WARNING"):
        load_controlnet(make_controlnet(), str(path), other)
    assert "does not record which base UNet" in caplog.text


def test_freeze_turns_off_gradients():
    unet = freeze(make_unet().train())
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


def test_training_inferer_trains_only_the_controlnet(latent_space, prompt_encoder):
    unet = freeze(make_unet())
    controlnet = controlnet_from_unet(make_controlnet(), unet.state_dict())
    settings = SchedulerSettings(num_train_timesteps=100)
    scheduler = settings.build("ddpm")
    prepare = ControlNetPrepareBatch(latent_space, prompt_encoder, scheduler, condition_key="flair")
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(2, 1, *IMAGE_SIZE, generator=g),
        "flair": torch.rand(2, 1, *IMAGE_SIZE, generator=g),
        "caption": ["a", "b"],
    }
    latents, target, args, kwargs = prepare(batch)
    assert set(kwargs) == {"noise", "timesteps", "condition", "controlnet_cond"}
    assert torch.equal(kwargs["controlnet_cond"], batch["flair"])
    pred = ControlNetTrainingInferer(scheduler, unet)(latents, controlnet, *args, **kwargs)
    assert pred.shape == target.shape
    torch.nn.functional.mse_loss(pred, target).backward()
    zero_conv_grads = [p.grad for n, p in controlnet.named_parameters() if "zero" in n or "controlnet_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in zero_conv_grads)
    assert all(p.grad is None for p in unet.parameters())


def test_guided_sampler_uses_condition_and_scale(latent_space):
    unet = freeze(make_unet())
    controlnet = controlnet_from_unet(make_controlnet(), unet.state_dict())
    with torch.no_grad():  # a trained ControlNet: non-zero output convolutions
        for name, p in controlnet.named_parameters():
            if "zero" in name or name.startswith("controlnet_"):
                p.normal_(0, 0.2)
    latents, context, cond = _inputs()
    uncond = torch.zeros_like(context)

    def sample(scale, guidance, condition):
        sampler = ControlNetGuidedSampler(
            latent_space,
            SchedulerSettings(num_train_timesteps=100),
            diffusion_model=unet,
            conditioning_scale=scale,
            num_inference_steps=3,
            guidance_scale=guidance,
            progress=False,
        )
        return sampler(latents, controlnet, context=context, uncond_context=uncond, controlnet_cond=condition)

    a = sample(1.0, 3.0, cond)
    assert a.shape == (2, 1, *IMAGE_SIZE)
    assert torch.equal(a, sample(1.0, 3.0, cond)), "deterministic with DDIM"
    assert not torch.allclose(a, sample(1.0, 3.0, cond.flip(0))), "the condition steers the output"
    # conditioning_scale 0 removes the ControlNet: the output no longer depends on the condition.
    assert torch.allclose(sample(0.0, 1.0, cond), sample(0.0, 1.0, cond.flip(0)))
    with pytest.raises(ValueError, match="conditioning_scale"):
        ControlNetGuidedSampler(latent_space, SchedulerSettings(), diffusion_model=unet, conditioning_scale=-1)


# --- condition images ------------------------------------------------------------------------------------------


def _nifti(path, array, affine=None):
    image = nib.Nifti1Image(
        np.asarray(array, dtype=np.float32), np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    )
    image.header["descrip"] = b"test volume"
    nib.save(image, str(path))
    return path


def test_load_slice_and_volume(tmp_path):
    rng = np.random.default_rng(0)
    s = load_condition_image(_nifti(tmp_path / "a.nii.gz", rng.random((16, 16))), IMAGE_SIZE)
    assert s.kind == "slice" and s.slices.shape == (1, 1, 16, 16) and not s.rescaled
    v = load_condition_image(_nifti(tmp_path / "v.nii.gz", rng.random((16, 16, 5)) * 800), IMAGE_SIZE)
    assert v.kind == "volume" and v.slices.shape == (5, 1, 16, 16) and v.rescaled
    assert 0 <= float(v.slices.min()) and float(v.slices.max()) <= 1
    assert v.stem == "v"


def test_to_unit_range_keeps_unit_data():
    x = np.linspace(0, 1, 10, dtype=np.float32)
    same, rescaled = to_unit_range(x)
    assert np.array_equal(same, x) and not rescaled


def test_png_input(tmp_path):
    writer = PILWriter(output_dtype=np.uint8, scale=255)
    array = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    writer.set_data_array(array[None], channel_dim=0, squeeze_end_dims=True)
    writer.set_metadata({"spatial_shape": array.shape})
    writer.write(str(tmp_path / "x.png"), verbose=False)
    c = load_condition_image(tmp_path / "x.png", IMAGE_SIZE)
    assert c.kind == "slice" and c.affine is None
    # Same orientation as MONAI's writer: the 8-bit PNG reads back (robustly rescaled) as the array written.
    assert c.rescaled and np.abs(c.slices[0, 0].numpy() - array).max() < 0.02


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.nii.gz", "not found"),
        (lambda d: _write(d / "x.txt", b"hello"), "Unsupported file type"),
        (lambda d: _write(d / "x.nii.gz", b"not a nifti"), "Cannot read"),
        (lambda d: _nifti(d / "big.nii.gz", np.ones((32, 16)) * np.arange(16)), "expects (16, 16)"),
        (lambda d: _nifti(d / "nan.nii.gz", np.where(np.eye(16) > 0, np.nan, 0.5)), "NaN"),
        (lambda d: _nifti(d / "4d.nii.gz", np.random.rand(16, 16, 3, 2)), "exactly one (FLAIR)"),
        (lambda d: _nifti(d / "flat.nii.gz", np.zeros((16, 16))), "constant"),
    ],
)
def test_bad_condition_images(tmp_path, make, message):
    with pytest.raises(ValueError) as info:
        load_condition_image(make(tmp_path), IMAGE_SIZE, modality="FLAIR")
    assert message in str(info.value)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_translation_requests_share_the_seed(tmp_path):
    v = load_condition_image(_nifti(tmp_path / "v.nii.gz", np.random.rand(16, 16, 3)), IMAGE_SIZE)
    requests = translation_requests(v, seed=7, prompt="")
    assert [r["slice"] for r in requests] == [0, 1, 2] and {r["seed"] for r in requests} == {7}
    with pytest.raises(ValueError, match="seed"):
        translation_requests(v, seed=-1)


class _Engine:
    """The part of an Ignite engine the writer reads: decollated batch and output of one iteration."""

    def __init__(self, batch, output):
        self.state = type("S", (), {"batch": batch, "output": output})()


def test_writer_keeps_volume_affine_and_header(tmp_path):
    affine = np.array([[0, -2.0, 0, 10], [2.0, 0, 0, -5], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    src = _nifti(tmp_path / "sub_FLAIR.nii.gz", np.random.rand(16, 16, 3), affine)
    cond = load_condition_image(src, IMAGE_SIZE)
    writer = TranslatedImageWriter(cond, str(tmp_path / "out"), seed=3, spacing=(2, 2), sidecar={"bundle": "b"})
    # slices arrive out of order and in two iterations
    for ks in ([2, 0], [1]):
        writer.collect(_Engine([{"slice": k} for k in ks], [{"pred": torch.full((1, 16, 16), k / 4)} for k in ks]))
    files = writer.write()
    out = nib.load(files[0])
    assert files[0].name == "sub_FLAIR_T1w_seed3.nii.gz" and len(files) == 1  # no PNG for a volume
    assert out.shape == (16, 16, 3) and np.allclose(out.affine, affine)
    assert out.header["descrip"].tobytes().startswith(b"test volume")
    assert np.allclose(out.get_fdata()[0, 0], [0, 0.25, 0.5])
    sidecar = json.loads((tmp_path / "out" / "sub_FLAIR_T1w_seed3.json").read_text())
    assert sidecar["num_slices"] == 3 and sidecar["bundle"] == "b" and sidecar["input_kind"] == "volume"


def test_writer_refuses_missing_slices(tmp_path):
    cond = load_condition_image(_nifti(tmp_path / "v.nii.gz", np.random.rand(16, 16, 2)), IMAGE_SIZE)
    writer = TranslatedImageWriter(cond, str(tmp_path / "out"), seed=0, spacing=(1, 1))
    writer.collect(_Engine([{"slice": 0}], [{"pred": torch.zeros(1, 16, 16)}]))
    with pytest.raises(RuntimeError, match="nothing written"):
        writer.write()
    assert not (tmp_path / "out").exists()


# --- evaluation ------------------------------------------------------------------------------------------------


def test_paired_metrics_values():
    label = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    pred = label.clone()
    pred[1] = (pred[1] + 0.1).clamp(0, 1)
    m = PairedImageMetrics((64, 64))(pred, label)
    assert m["mae"][0] == 0 and 0.05 < m["mae"][1] < 0.1
    assert m["psnr"][1] == pytest.approx(-10 * np.log10(((pred[1] - label[1]) ** 2).mean().item()), rel=1e-4)
    assert m["ms_ssim"][0] == pytest.approx(1.0, abs=1e-4) and m["ms_ssim"][1] < 1


def test_translation_report_writes_results(tmp_path):
    from common.bundle_metadata import update_eval_metrics  # noqa: F401  (metadata writer used by the report)

    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"name": "x", "eval_metrics": {}}))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- evaluation:start -->\nold\n<!-- evaluation:end -->\nb\n")
    report = TranslationReport(
        (64, 64),
        condition_key="flair",
        results_path=str(tmp_path / "r.json"),
        metadata_path=str(meta),
        readme_path=str(readme),
        figure_path=str(tmp_path / "fig.png"),
        figure_rows=2,
        figure_scale=2,
        reference={"source": "article", "psnr": [26.25, 1.01]},
        metric_prefix="test_",
    )
    report.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        label = torch.rand(2, 1, 64, 64, generator=g)
        engine = _Engine(
            [{"flair": torch.rand(1, 64, 64, generator=g)} for _ in range(2)],
            [{"pred": (x + 0.05).clamp(0, 1), "label": x} for x in label],
        )
        report.collect(engine)
    results = report.report()
    assert results["num_test_images"] == 4 and len(results["per_image"]["psnr"]) == 4
    assert json.loads(meta.read_text())["eval_metrics"]["test_psnr"] == results["metrics"]["psnr"]
    text = readme.read_text()
    assert "old" not in text and "26.25 ± 1.01" in text and "MS-SSIM" in text
    from PIL import Image

    # rows: examples; columns: condition | generated | true; each slice upscaled x2
    assert Image.open(tmp_path / "fig.png").size == (2 * 3 * 64, 2 * 2 * 64)
