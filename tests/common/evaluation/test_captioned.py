"""common.evaluation.captioned: one sample per test caption, judged by FID, diversity and an adherence measure."""

from __future__ import annotations

import pytest
import torch

from common.evaluation.brain_measures import BrainMeasureAdherence
from common.evaluation.captioned import CaptionedGeneration
from common.evaluation.generation import results_table
from tests.common.evaluation.test_brain_measures import synthetic_brain
from tests.helpers.fakes import generation_results

VOLUMES = (8.0, 14.0, 22.0, 30.0, 40.0, 55.0, 12.0, 35.0)  # ml: small, medium and large ventricles


def radius(volume_ml: float) -> float:
    return 3.0 + 0.2 * volume_ml


def entries() -> list[dict]:
    return [
        {"caption": f"brain with ventricles of {v} ml", "ventricle_volume_ml": v, "image": f"{i}.nii.gz"}
        for i, v in enumerate(VOLUMES)
    ]


def real_images() -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(synthetic_brain(ventricle_radius=radius(v), seed=i)[0])[None] for i, v in enumerate(VOLUMES)]
    )


class PromptEncoder:
    """Context (B, 1, 1): the ventricle volume written at the end of the caption (0 for the empty prompt)."""

    def __call__(self, prompts):
        return torch.tensor([float(p.split()[-2]) if p else 0.0 for p in prompts]).reshape(-1, 1, 1)


class Sampler:
    """A model whose ventricles follow the prompt (``follow``) or are the same size whatever it says."""

    guidance_scale, guidance_interval, num_inference_steps, eta, scheduler_name, precision = (
        3.0,
        (1.0, 5.0),
        50,
        0.0,
        "ddim",
        "bf16",
    )
    distilled_guidance = None

    def __init__(self, follow: bool) -> None:
        self.follow = follow
        self.noises: list[torch.Tensor] = []

    def guided_steps(self) -> int:
        return 17

    def __call__(self, noise, network, context, uncond_context):
        self.noises.append(noise.clone())
        volumes = context[:, 0, 0].tolist() if self.follow else [20.0] * len(noise)
        # the ignoring model also ignores its noise: one image whatever the input, so its adherence r is undefined
        seeds = [int(1000 * abs(float(n.flatten()[0]))) if self.follow else 0 for n in noise]
        return torch.stack(
            [
                torch.from_numpy(synthetic_brain(ventricle_radius=radius(v), seed=s)[0])[None]
                for v, s in zip(volumes, seeds, strict=True)
            ]
        )


def features(images: torch.Tensor) -> torch.Tensor:
    """Mean intensity and central-darkness per image: enough to tell ventricle sizes apart."""
    centre = images[:, 0, 38:58, 46:66].flatten(1).mean(1)
    return torch.stack([images.flatten(1).mean(1), centre, images.flatten(1).std(1)], dim=1).double()


def captioned_generation(sampler, items=None, **kwargs) -> CaptionedGeneration:
    return CaptionedGeneration(sampler, entries() if items is None else items, BrainMeasureAdherence(2.0), **kwargs)


def run(follow: bool, **kwargs):
    sampler = Sampler(follow)
    captioned = captioned_generation(sampler, **{"batch_size": 3, "seed": 4, **kwargs})
    return captioned(torch.nn.Identity(), PromptEncoder(), (1, 24, 28), "cpu", real_images(), features), sampler


def test_a_model_that_follows_its_captions_adheres_like_the_real_slices_and_one_that_ignores_them_does_not():
    followed, _ = run(follow=True)
    ignored, _ = run(follow=False)
    real_r = followed["condition_adherence"]["real_test_images"]["ventricle"]["pearson_r"]
    assert real_r > 0.9
    assert followed["condition_adherence"]["generated"]["ventricle"]["pearson_r"] == pytest.approx(real_r, abs=0.05)
    assert ignored["condition_adherence"]["generated"]["ventricle"]["pearson_r"] is None  # one size: undefined r
    assert followed["fid"] < ignored["fid"]
    metrics = captioned_generation(Sampler(True)).metrics(followed)
    assert metrics["captioned_fid"] == round(followed["fid"], 4)
    assert metrics["ventricle_adherence_pearson_r"] > 0.9
    assert "ventricle_adherence_pearson_r" not in captioned_generation(Sampler(False)).metrics(ignored)
    assert (followed["guidance_scale"], followed["guidance_interval"], followed["guided_steps"]) == (
        3.0,
        [1.0, 5.0],
        17,
    )
    assert followed["num_samples"] == len(VOLUMES) and followed["precision"] == "bf16"


def test_sample_i_starts_from_noise_seeded_seed_plus_i_whatever_the_batching():
    _, sampler = run(follow=True, seed=4)
    noise = torch.cat(sampler.noises)
    assert [len(n) for n in sampler.noises] == [3, 3, 2]
    for i in range(len(VOLUMES)):
        expected = torch.randn((1, 24, 28), generator=torch.Generator().manual_seed(4 + i))
        torch.testing.assert_close(noise[i], expected)


def test_entries_without_a_caption_and_a_real_set_of_another_size_are_refused():
    broken = entries()
    broken[2]["caption"] = " "
    with pytest.raises(ValueError, match="no caption.*index 2.*'caption'"):
        captioned_generation(Sampler(True), broken)
    captioned = captioned_generation(Sampler(True))
    with pytest.raises(ValueError, match="7 real images for 8 test entries"):
        captioned(torch.nn.Identity(), PromptEncoder(), (1, 24, 28), "cpu", real_images()[:7], features)


def test_results_table_shows_the_captioned_figures_beside_the_real_slices_and_the_sampling_settings():
    captioned, _ = run(follow=True)
    results = generation_results(num_real_test_images=len(VOLUMES), captioned_generation=captioned)
    table = results_table(results)
    generated = captioned["condition_adherence"]["generated"]["ventricle"]["pearson_r"]
    real = captioned["condition_adherence"]["real_test_images"]["ventricle"]["pearson_r"]
    assert f"| FID, one sample per test caption (8) | {captioned['fid']:.4f} |" in table
    assert (
        f"| ventricle adherence Pearson r, requested volume vs measured area (real test images: {real:.4f}) | "
        f"{generated:.4f} |"
    ) in table
    assert "guidance 3.0 on the 17 steps with noise level in (1.0, 5.0], bf16" in table


def test_real_features_the_caller_has_are_used_instead_of_extracting_them_again():
    calls = []

    def counting(images):
        calls.append(len(images))
        return features(images)

    real = real_images()
    captioned = captioned_generation(Sampler(True), batch_size=4)
    given = captioned(torch.nn.Identity(), PromptEncoder(), (1, 24, 28), "cpu", real, counting, features(real))
    assert calls == [len(VOLUMES)], "only the generated images are embedded"
    assert given["fid"] == pytest.approx(
        captioned(torch.nn.Identity(), PromptEncoder(), (1, 24, 28), "cpu", real, features)["fid"]
    )


def test_the_first_non_empty_text_is_the_prompt():
    """A report without an impression is prompted with its findings; one with neither is refused."""
    items = [{**entry, "impression": "", "findings": entry["caption"]} for entry in entries()]
    items[0]["impression"] = "brain with ventricles of 8.0 ml"
    captioned = captioned_generation(Sampler(True), items, prompt_keys=("impression", "findings"))
    assert captioned.prompts == [entry["caption"] for entry in entries()]
    items[3]["findings"] = None
    with pytest.raises(ValueError, match=r"index 3.*\['impression', 'findings'\]"):
        captioned_generation(Sampler(True), items, prompt_keys=("impression", "findings"))
