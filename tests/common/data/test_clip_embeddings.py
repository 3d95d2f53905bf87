"""common.data.clip_embeddings (and common.data.encoded_cache): CLIP image embeddings encoded once, never stale."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, LoadImaged

from common.data.clip_embeddings import ClipImageEmbeddingCache
from common.networks.clip_model import ClipEncoder, build_small_clip
from tests.conftest import TOKENIZER_DIR, _cached_tokenizer

SMALL = {"image_size": 32, "patch_size": 8, "vision_width": 16, "text_width": 16, "heads": 2, "projection_dim": 8}


@pytest.fixture
def items(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        path = tmp_path / f"slice{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((20, 28)).astype(np.float32), np.eye(4)), path)
        out.append({"image": str(path), "caption": f"slice {i}"})
    return out


def _clip(seed: int) -> ClipEncoder:
    return ClipEncoder(build_small_clip(**SMALL, seed=seed), _cached_tokenizer(str(TOKENIZER_DIR))).eval()


LOAD = Compose(
    [LoadImaged("image", ensure_channel_first=True, image_only=True), EnsureTyped("image", track_meta=False)]
)


def test_embeddings_are_the_clip_s_and_replace_or_keep_the_image(items):
    clip = _clip(0)
    cached = ClipImageEmbeddingCache(clip, LOAD, batch_size=2, progress=False)(items)
    images = torch.stack([LOAD(dict(item))["image"] for item in items])
    with torch.no_grad():
        expected = clip.encode_images(images)
    assert torch.stack([item["image_embedding"] for item in cached]).allclose(expected, atol=1e-6)
    assert all("image" not in item and item["caption"] == f"slice {i}" for i, item in enumerate(cached))
    assert "image_embedding" not in items[0], "the input items are not modified"
    kept = ClipImageEmbeddingCache(clip, LOAD, keep_image=True, progress=False)(items)
    assert [item["image"] for item in kept] == [item["image"] for item in items]
    clip.train()
    ClipImageEmbeddingCache(clip, LOAD, progress=False)(items)
    assert clip.training, "encoding leaves the CLIP's mode as it was"


def test_cache_file_is_reused_and_never_stale(items, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = ClipImageEmbeddingCache(_clip(0), LOAD, cache_dir=cache_dir, progress=False)
    embeddings = torch.stack([item["image_embedding"] for item in first(items)])
    assert len(list(cache_dir.glob("clip_image_embeddings_*.pt"))) == 1

    again = ClipImageEmbeddingCache(_clip(0), LOAD, cache_dir=cache_dir, progress=False)
    monkeypatch.setattr(again, "encode", lambda images: pytest.fail("a cached data set is not encoded again"))
    assert torch.equal(torch.stack([item["image_embedding"] for item in again(items)]), embeddings)
    monkeypatch.undo()

    other = ClipImageEmbeddingCache(_clip(1), LOAD, cache_dir=cache_dir, progress=False)
    assert not torch.equal(torch.stack([item["image_embedding"] for item in other(items)]), embeddings)
    nib.save(nib.Nifti1Image(np.zeros((20, 28), np.float32), np.eye(4)), items[0]["image"])  # a changed image
    ClipImageEmbeddingCache(_clip(0), LOAD, cache_dir=cache_dir, progress=False)(items)
    assert len(list(cache_dir.glob("clip_image_embeddings_*.pt"))) == 3, "another CLIP or changed images: new files"
    assert ClipImageEmbeddingCache(_clip(0), LOAD, enabled=False)(items) == items
