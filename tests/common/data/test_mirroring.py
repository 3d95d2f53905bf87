"""common.data.mirroring: a mirrored copy of a pair stays aligned, also through the latent cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, LoadImaged

from common.data.mirroring import MIRRORED_KEY, MirroredFlipd, mirrored_copies
from common.diffusion.latent_cache import LatentMomentsCache
from common.diffusion.latent_space import MU_KEY, ScaledLatentSpace
from tests.conftest import IMAGE_SIZE, make_autoencoder
from tests.helpers.fakes import write_nifti


def _load(keys):
    return [
        LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    return [
        {
            "image": str(write_nifti(tmp_path / f"t1_{i}.nii.gz", rng.random(IMAGE_SIZE))),
            "flair": str(write_nifti(tmp_path / f"flair_{i}.nii.gz", rng.random(IMAGE_SIZE))),
        }
        for i in range(3)
    ]


def test_copies_double_the_set_and_are_marked(pairs):
    doubled = mirrored_copies(pairs)
    assert len(doubled) == 6
    assert [d[MIRRORED_KEY] for d in doubled] == [False] * 3 + [True] * 3
    assert [d["image"] for d in doubled] == [p["image"] for p in pairs] * 2
    assert mirrored_copies(pairs, enabled=False) == pairs and MIRRORED_KEY not in pairs[0]
    with pytest.raises(ValueError, match="True or False"):
        mirrored_copies(pairs, enabled="yes")


def test_only_marked_items_are_flipped_left_right_and_keep_their_type():
    image = torch.arange(12.0).reshape(1, 3, 4)
    flip = MirroredFlipd(keys=["image", "flair"])
    plain = flip({"image": image, "flair": image + 1, MIRRORED_KEY: False})
    mirrored = flip({"image": image, "flair": image + 1, MIRRORED_KEY: True})
    assert torch.equal(plain["image"], image)
    assert torch.equal(mirrored["image"], image.flip(1)) and torch.equal(mirrored["flair"], (image + 1).flip(1))
    assert type(mirrored["image"]) is torch.Tensor, "a batch of plain and mirrored items must collate"
    assert torch.equal(flip({"image": image})["image"], image), "unmarked items pass"


def test_a_mirrored_pair_is_the_flipped_condition_with_the_code_of_the_flipped_target(pairs, tmp_path):
    """The training path: the cache encodes the flipped T1w, training flips the FLAIR; a batch mixes both kinds."""
    space = ScaledLatentSpace(make_autoencoder())
    flip = MirroredFlipd(keys="image")
    cache = LatentMomentsCache(
        space,
        Compose([*_load("image"), flip]),
        cache_dir=tmp_path / "cache",
        progress=False,
        identity_keys=[MIRRORED_KEY],
    )
    items = cache(mirrored_copies(pairs))
    train = Compose([*_load("flair"), MirroredFlipd(keys="flair")])
    batch = next(iter(DataLoader(Dataset(items, train), batch_size=6)))
    t1 = torch.stack([Compose(_load("image"))(p)["image"] for p in pairs])
    flair = torch.stack([Compose(_load("flair"))(p)["flair"] for p in pairs])
    mu, _ = space.moments(torch.cat([t1, t1.flip(2)]))
    torch.testing.assert_close(batch[MU_KEY], mu)
    torch.testing.assert_close(batch["flair"], torch.cat([flair, flair.flip(2)]))
    # the mark is part of the cache's identity: the same files, all mirrored, are not read from the plain ones' cache
    plain = cache([{**p, MIRRORED_KEY: False} for p in pairs])
    mirrored = cache([{**p, MIRRORED_KEY: True} for p in pairs])
    torch.testing.assert_close(torch.stack([m[MU_KEY] for m in mirrored]), mu[3:])
    torch.testing.assert_close(torch.stack([m[MU_KEY] for m in plain]), mu[:3])
    assert len(list((tmp_path / "cache").glob("latent_moments_*.pt"))) == 3
