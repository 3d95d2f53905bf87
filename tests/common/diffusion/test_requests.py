"""common.diffusion.requests: sample and translation requests, each with its own seed."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.condition_images import load_condition_image
from common.diffusion.requests import sample_requests, translation_requests
from tests.conftest import IMAGE_SIZE
from tests.helpers.fakes import write_nifti


def test_translation_requests_share_the_seed(tmp_path):
    v = load_condition_image(write_nifti(tmp_path / "v.nii.gz", np.random.rand(16, 16, 3)), IMAGE_SIZE, "FLAIR")
    requests = translation_requests(v, seed=7, prompt="")
    assert [r["slice"] for r in requests] == [0, 1, 2] and {r["seed"] for r in requests} == {7}
    with pytest.raises(ValueError, match="seed"):
        translation_requests(v, seed=-1)


def test_over_long_prompt_error_states_the_real_limit():
    with pytest.raises(ValueError, match="1200 characters, more than the 1000 accepted"):
        sample_requests("x" * 1200, 1, 0)
    with pytest.raises(ValueError, match="more than the 50 accepted"):
        sample_requests("x" * 60, 1, 0, max_prompt_chars=50)


def test_translation_prompts_follow_the_same_rules_as_generation_prompts(tmp_path):
    v = load_condition_image(write_nifti(tmp_path / "v.nii.gz", np.random.rand(16, 16, 1)), IMAGE_SIZE, "FLAIR")
    assert translation_requests(v, seed=0, prompt="")[0]["prompt"] == ""  # no prompt: allowed for translation
    with pytest.raises(ValueError, match="more than the 1000 accepted"):
        translation_requests(v, seed=0, prompt="x" * 1001)
    with pytest.raises(ValueError, match="more than the 1000 accepted"):
        sample_requests("x" * 1001, 1, 0)
