"""common.networks.feature_extractors (FID features) and train-feature-network."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric

from common.data.brain.phantoms import FEATURE_TARGETS
from common.io.weights import load_weights
from common.networks.feature_extractors import (
    FeatureExtractor,
    PhantomFeatureNet,
    build_feature_extractor,
    phantom_feature_extractor,
    radimagenet_preprocess,
)
from tests.helpers import REPO_ROOT
from tools import train_feature_network

SHIPPED_WEIGHTS = REPO_ROOT / "bundles/brain_t1_ldm/models/feature_network.pt"


def _random_net(seed: int = 0) -> PhantomFeatureNet:
    torch.manual_seed(seed)
    return PhantomFeatureNet().eval()


def _save_random_checkpoint(path: Path, seed: int = 0) -> None:
    net = _random_net(seed)
    torch.save(
        {
            "feature_network": net.state_dict(),
            "network_config": {"channels": list(net.channels), "depths": list(net.depths), "num_targets": 6},
            "targets": list(FEATURE_TARGETS),
        },
        path,
    )


def _blobs(n: int, seed: int, size=(80, 112)) -> torch.Tensor:
    """Phantom-like images: a smooth bright ellipse with a dark centre on black, randomly jittered."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) - 0.5) * 0.2
        ry, rx = 0.7 + 0.1 * torch.rand(2, generator=g)
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        img = 0.8 * torch.sigmoid((1 - r) * 20) - 0.5 * torch.exp(-r * 30)
        out.append((img + 0.02 * torch.randn(h, w, generator=g)).clamp(0, 1))
    return torch.stack(out)[:, None]


@pytest.mark.parametrize("size", [(80, 112), (160, 224)])
def test_phantom_net_shapes(size):
    net = _random_net()
    x = torch.rand(3, 1, *size)
    with torch.no_grad():
        assert net.features(x).shape == (3, net.feature_dim) == (3, 64)
        assert net(x).shape == (3, len(FEATURE_TARGETS))


def test_phantom_net_rejects_bad_size():
    with pytest.raises(ValueError, match="divisible by 16"):
        _random_net().features(torch.rand(1, 1, 80, 100))


def test_build_phantom_extractor_shapes_determinism_and_eval(tmp_path):
    path = tmp_path / "fn.pt"
    _save_random_checkpoint(path)
    extractor = build_feature_extractor("phantom", str(path), batch_size=4)
    assert isinstance(extractor, FeatureExtractor) and not extractor.training
    extractor.train()  # must stay in eval mode: batch-norm statistics are part of the metric
    assert not extractor.training
    images = torch.rand(10, 1, 80, 112, requires_grad=True)
    a = extractor(images)
    b = build_feature_extractor("phantom", str(path), batch_size=7)(images)
    assert a.shape == (10, 64) and a.dtype == torch.float32 and not a.requires_grad
    torch.testing.assert_close(a, b)  # batching and rebuilding do not change features
    torch.testing.assert_close(a[3:4], extractor(images[3:4]))  # per-image, independent of the batch
    assert extractor(torch.rand(2, 1, 160, 224)).shape == (2, 64)


def test_unknown_kind():
    with pytest.raises(ValueError, match="phantom.*radimagenet_resnet50"):
        build_feature_extractor("inception_v3", None)


def test_missing_phantom_weights_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-feature-network"):
        build_feature_extractor("phantom", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="train-feature-network"):
        build_feature_extractor("phantom", None)
    # a bundle names its own command
    with pytest.raises(FileNotFoundError, match="run THIS"):
        build_feature_extractor("phantom", str(tmp_path / "missing.pt"), how_to_get="run THIS")


def test_unknown_settings_are_refused():
    """A mistyped key in a config must not pass silently."""
    with pytest.raises(TypeError, match="batchsize"):
        build_feature_extractor("phantom", None, batchsize=8)


def test_foreign_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"autoencoder": {}}, path)
    with pytest.raises(ValueError, match="feature_network"):
        build_feature_extractor("phantom", str(path))


def test_missing_radimagenet_cache_names_what_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_feature_extractor("radimagenet_resnet50", str(tmp_path))
    message = str(info.value)
    for part in ("Project-MONAI/perceptual-models", "RadImageNet-ResNet50_notop.pth", "PerceptualLoss", str(tmp_path)):
        assert part in message


def test_radimagenet_preprocess_matches_monai():
    from monai.losses.perceptual import subtract_mean

    x = torch.rand(2, 1, 16, 16)
    expected = subtract_mean(x.repeat(1, 3, 1, 1)[:, [2, 1, 0]].clone())
    torch.testing.assert_close(radimagenet_preprocess(x), expected)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning", "ignore::DeprecationWarning")
def test_features_separate_different_image_sets():
    """Even a random-init net gives a far larger FID between blobs and noise than between two halves of the blobs."""
    extractor = phantom_feature_extractor(_random_net())
    blobs = extractor(_blobs(64, seed=1)).double()
    noise = extractor(torch.rand(32, 1, 80, 112, generator=torch.Generator().manual_seed(2))).double()
    fid = FIDMetric()
    within = float(fid(blobs[:32], blobs[32:]))
    between = float(fid(noise, blobs[32:]))
    assert between > 10 * within > 0  # random-init features are small: compare ratios, not absolute values


def test_train_tool_writes_weights_only_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    entries = []
    for i in range(6):
        name = f"images/img{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((32, 48), dtype=np.float32), np.eye(4)), str(tmp_path / name))
        entries.append({"image": name, **{t: float(rng.random() + i) for t in FEATURE_TARGETS}})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries[:4], "validation": entries[4:]}))
    out = tmp_path / "fn.pt"
    try:
        result = train_feature_network.train_feature_network(
            dataset_dir=str(tmp_path), output=str(out), epochs=2, batch_size=2, channels=(4, 4, 8, 8)
        )
    finally:
        torch.use_deterministic_algorithms(False)  # the tool turns it on process-wide
    assert set(result["validation_r2"]) == set(FEATURE_TARGETS)
    state = load_weights(out)
    assert state["targets"] == list(FEATURE_TARGETS) and len(state["target_mean"]) == len(FEATURE_TARGETS)
    features = build_feature_extractor("phantom", str(out))(torch.rand(2, 1, 32, 48))
    assert features.shape == (2, 8)
    # the file records its architecture (rebuilt by the allow-listed loader) and says it is demo weights
    from common.networks.architecture import load_network

    assert isinstance(load_network(out, "feature_network"), PhantomFeatureNet)
    assert state["provenance"]["demo"] is True


@pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="shipped feature network not trained yet")
def test_shipped_weights_load_and_are_small():
    assert SHIPPED_WEIGHTS.stat().st_size < 1_000_000
    state = load_weights(SHIPPED_WEIGHTS)
    assert state["targets"] == list(FEATURE_TARGETS)
    features = build_feature_extractor("phantom", str(SHIPPED_WEIGHTS))(torch.rand(4, 1, 80, 112))
    assert features.shape == (4, 64) and torch.isfinite(features).all()


def test_radimagenet_loads_from_local_hub_dir_only(tmp_path):
    """A stand-in hub repository in the expected layout is loaded with torch.hub from disk (no network)."""
    repo = tmp_path / "Project-MONAI_perceptual-models_main"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "import os\nimport torch\ndependencies = ['torch']\n\n\n"
        "def radimagenet_resnet50(cache_dir=None, file_name='RadImageNet-ResNet50_notop.pth'):\n"
        "    assert os.path.exists(os.path.join(cache_dir, file_name))\n"
        "    return torch.nn.Conv2d(3, 2048, kernel_size=4, stride=4)\n"
    )
    (tmp_path / "RadImageNet-ResNet50_notop.pth").write_bytes(b"stand-in")
    extractor = build_feature_extractor("radimagenet_resnet50", str(tmp_path), batch_size=2)
    assert extractor(torch.rand(3, 1, 32, 32)).shape == (3, 2048)
