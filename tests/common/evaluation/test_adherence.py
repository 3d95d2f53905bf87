"""common.evaluation.adherence: per-finding AUROC of images generated from stating and negating prompts."""

from __future__ import annotations

import pytest
import torch

from common.evaluation.adherence import ConditionAdherence, FindingPrompts
from common.evaluation.generation import results_table
from tests.helpers.fakes import generation_results

FINDINGS = ("cardiomegaly", "pleural_effusion")
PROMPTS = {
    "pleural_effusion": {
        "stated": ["Large left pleural effusion.", "Small right pleural effusion."],
        "negated": ["No pleural effusion."],
    },
}


class PromptEncoder:
    """Context (B, 2, 1): 1.0 where the prompt states an effusion (no negation), else 0.0."""

    def __call__(self, prompts):
        values = [float("effusion" in p and not p.startswith("No")) for p in prompts]
        return torch.tensor(values).reshape(-1, 1, 1).expand(-1, 2, 1)


class Sampler:
    """Images whose brightness is ``follow * context + noise``: a model that follows its prompt (or ignores it)."""

    guidance_scale, num_inference_steps, scheduler_name = 7.0, 50, "ddim"

    def __init__(self, follow: float) -> None:
        self.follow = follow
        self.noises: list[torch.Tensor] = []

    def __call__(self, noise, network, context, uncond_context):
        self.noises.append(noise.clone())
        level = self.follow * context[:, 0, 0] + 0.1 * noise.flatten(1).mean(1)
        return level.reshape(-1, 1, 1, 1).expand(-1, 1, *noise.shape[-2:])


class Classifier:
    findings = FINDINGS

    def __call__(self, images):
        brightness = images.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(brightness), brightness], dim=1)


def adherence(follow: float, **kwargs) -> tuple[ConditionAdherence, Sampler]:
    sampler = Sampler(follow)
    return ConditionAdherence(sampler, Classifier(), PROMPTS, **{"samples_per_prompt": 4, **kwargs}), sampler


def test_a_model_that_follows_its_prompt_scores_one_and_one_that_ignores_it_chance():
    followed, _ = adherence(follow=0.5)
    result = followed(torch.nn.Identity(), PromptEncoder(), (1, 4, 4))
    assert result["auroc"] == {"pleural_effusion": 1.0}
    assert result["mean_auroc"] == 1.0
    assert result["per_prompt"]["pleural_effusion"]["Large left pleural effusion."] > 0.4
    assert result["per_prompt"]["pleural_effusion"]["No pleural effusion."] < 0.1
    assert (result["guidance_scale"], result["num_inference_steps"], result["scheduler"]) == (7.0, 50, "ddim")

    ignored, _ = adherence(follow=0.0)
    assert ignored(torch.nn.Identity(), PromptEncoder(), (1, 4, 4))["auroc"]["pleural_effusion"] == 0.5


def test_stated_and_negated_prompts_start_from_the_same_noise():
    scorer, sampler = adherence(follow=0.5, samples_per_prompt=3, batch_size=2)
    assert scorer.num_images == 9
    scorer(torch.nn.Identity(), PromptEncoder(), (1, 4, 4))
    per_prompt = [torch.cat(sampler.noises[i : i + 2]) for i in range(0, 6, 2)]  # 3 samples in batches of 2 and 1
    torch.testing.assert_close(per_prompt[0], per_prompt[2])
    torch.testing.assert_close(per_prompt[1], per_prompt[2])
    assert not torch.equal(per_prompt[0][0], per_prompt[0][1])  # samples of one prompt differ


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({"nodule": {"stated": ["A nodule."], "negated": ["No nodule."]}}, "does not score"),
        ({"pleural_effusion": {"stated": [], "negated": ["No pleural effusion."]}}, "non-empty list"),
        ({"pleural_effusion": {"stated": "Effusion.", "negated": ["No pleural effusion."]}}, "non-empty list"),
        ({"pleural_effusion": {"stated": ["  "], "negated": ["No pleural effusion."]}}, "non-empty prompts"),
        ({"pleural_effusion": ["Effusion."]}, "'stated'"),
        ({}, "at least one finding"),
    ],
)
def test_bad_prompt_sets_are_refused_before_any_sampling(prompts, message):
    with pytest.raises(ValueError, match=message):
        ConditionAdherence(Sampler(1.0), Classifier(), prompts)


def test_samples_per_prompt_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        adherence(follow=1.0, samples_per_prompt=0)


def test_prompts_from_the_config_layout():
    (entry,) = FindingPrompts.from_mapping(PROMPTS)
    assert entry.stated == ("Large left pleural effusion.", "Small right pleural effusion.")
    assert entry.negated == ("No pleural effusion.",)


def test_results_table_lists_each_finding_and_the_mean():
    results = generation_results(
        condition_adherence={
            "auroc": {"pleural_effusion": 0.9, "pneumothorax": None},
            "mean_auroc": 0.9,
            "samples_per_prompt": 8,
            "guidance_scale": 7.0,
            "num_inference_steps": 50,
            "scheduler": "ddim",
        }
    )
    table = results_table(results)
    assert "| condition adherence AUROC, pleural effusion | 0.9000 |" in table
    assert "| condition adherence AUROC, pneumothorax | n/a |" in table
    assert "| condition adherence AUROC, mean | 0.9000 |" in table
    assert "guidance 7.0" in table and "8 samples per prompt" in table
