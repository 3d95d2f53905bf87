"""common.networks.xrv_features: torchxrayvision DenseNet-121 FID features from a local weights file."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.networks.feature_extractors import FeatureExtractor
from common.networks.xrv_features import (
    XRV_DENSENET_WEIGHTS_NAME,
    XRV_HOW_TO_GET,
    load_xrv_densenet121,
    xrv_feature_extractor,
    xrv_preprocess,
)

# torchxrayvision cannot be imported here (it needs torchvision), so the reference is its DenseNet rewritten with
# the same module tree: same state-dict keys (727 in xrv 1.5.7's DenseNet(weights=None)), same forward.


class _DenseLayer(nn.Sequential):
    def __init__(self, cin: int, growth: int = 32, bn_size: int = 4) -> None:
        mid = bn_size * growth
        super().__init__(
            OrderedDict(
                norm1=nn.BatchNorm2d(cin),
                relu1=nn.ReLU(),
                conv1=nn.Conv2d(cin, mid, 1, bias=False),
                norm2=nn.BatchNorm2d(mid),
                relu2=nn.ReLU(),
                conv2=nn.Conv2d(mid, growth, 3, padding=1, bias=False),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], 1)


class _DenseBlock(nn.Sequential):
    def __init__(self, layers: int, cin: int, growth: int = 32) -> None:
        super().__init__(OrderedDict((f"denselayer{i + 1}", _DenseLayer(cin + i * growth)) for i in range(layers)))


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(cin),
                relu=nn.ReLU(),
                conv=nn.Conv2d(cin, cout, 1, bias=False),
                pool=nn.AvgPool2d(2, 2),
            )
        )


class DenseNet(nn.Module):
    """xrv.models.DenseNet's layout: ``features`` (stem, 4 dense blocks, 3 transitions, norm5), ``classifier``."""

    def __init__(self, num_classes: int = 18, block_config=(6, 12, 24, 16)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False),
                norm0=nn.BatchNorm2d(64),
                relu0=nn.ReLU(),
                pool0=nn.MaxPool2d(3, stride=2, padding=1),
            )
        )
        channels = 64
        for i, layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(layers, channels))
            channels += 32 * layers
            if i < len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def features2(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)


def _random_reference(seed: int = 0, num_classes: int = 18) -> DenseNet:
    torch.manual_seed(seed)
    net = DenseNet(num_classes)
    with torch.no_grad():  # non-trivial batch-norm statistics, so a mis-mapped norm layer changes the output
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def reference() -> DenseNet:
    return _random_reference()


@pytest.fixture(scope="module")
def pickled_model_file(reference: DenseNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole pickled model in torch's legacy (pre-1.6) format, as torchxrayvision's released file is."""
    path = tmp_path_factory.mktemp("xrv") / XRV_DENSENET_WEIGHTS_NAME
    torch.save(reference, path, _use_new_zipfile_serialization=False)
    return path


def _inputs(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 224, 224, generator=g) * 2048 - 1024


def test_reference_has_xrv_key_layout(reference: DenseNet) -> None:
    keys = list(reference.state_dict())
    assert len(keys) == 727
    assert keys[:2] == ["features.conv0.weight", "features.norm0.weight"]
    assert "features.denseblock4.denselayer16.conv2.weight" in keys
    assert keys[-2:] == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("form", ["legacy_pickled_model", "zip_pickled_model", "state_dict"])
def test_features_equal_xrv_features2(form: str, reference: DenseNet, pickled_model_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    if form == "legacy_pickled_model":
        path = pickled_model_file
    elif form == "zip_pickled_model":
        torch.save(reference, path)
    else:
        state = reference.state_dict()
        state["op_threshs"] = torch.rand(18)  # what a loaded xrv model's state_dict carries too; ignored
        torch.save(state, path)
    model = load_xrv_densenet121(path)
    x = _inputs()
    with torch.no_grad():
        features = model(x.clone())
        expected = reference.features2(x)
        logits = model.logits(x.clone())
    assert features.shape == (2, 1024)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits, reference.classifier(expected), rtol=1e-5, atol=1e-4)
    assert not model.training


def test_preprocess_transposes_crops_and_scales() -> None:
    g = torch.Generator().manual_seed(0)
    pil = torch.rand(2, 1, 300, 224, generator=g)  # (N, 1, W, H): 300 wide, 224 high
    out = xrv_preprocess(pil)
    upright = pil.transpose(-1, -2)  # (N, 1, 224 rows, 300 cols): centre square = columns 38..261
    assert out.shape == (2, 1, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, upright[..., 38:262] * 2048 - 1024)
    torch.testing.assert_close(xrv_preprocess(pil, transpose=False), pil[..., 38:262, :] * 2048 - 1024)


def test_preprocess_range_and_resize() -> None:
    out = xrv_preprocess(torch.tensor([0.0, 1.0, -0.2, 1.3]).view(4, 1, 1, 1).expand(4, 1, 448, 448))
    assert out.shape == (4, 1, 224, 224)
    assert out[0].unique().tolist() == [-1024.0] and out[1].unique().tolist() == [1024.0]
    assert out[2].unique().tolist() == [-1024.0] and out[3].unique().tolist() == [1024.0]  # clamped
    small = xrv_preprocess(torch.rand(1, 1, 128, 128))  # the cxr_ldm image size is upsampled
    assert small.shape == (1, 1, 224, 224) and small.min() >= -1024 and small.max() <= 1024
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        xrv_preprocess(torch.rand(1, 3, 64, 64))


def test_extractor_is_deterministic_and_batched(reference: DenseNet, pickled_model_file: Path) -> None:
    extractor = xrv_feature_extractor(pickled_model_file, batch_size=2)
    assert isinstance(extractor, FeatureExtractor) and extractor.feature_dim == 1024
    images = torch.rand(3, 1, 256, 240, generator=torch.Generator().manual_seed(2))
    first = extractor(images)
    assert first.shape == (3, 1024) and first.dtype == torch.float32
    torch.testing.assert_close(extractor(images), first, rtol=0, atol=0)
    with torch.no_grad():
        expected = reference.features2(xrv_preprocess(images))
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-4)


def test_missing_file_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_xrv_densenet121(tmp_path / XRV_DENSENET_WEIGHTS_NAME)
    assert XRV_HOW_TO_GET in str(err.value)
    assert "https://github.com/mlmed/torchxrayvision/releases/download/v1/" in XRV_HOW_TO_GET
    assert "--feature_extractor_weights PATH" in XRV_HOW_TO_GET


def test_wrong_files_are_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="not torchxrayvision's DenseNet-121"):
        load_xrv_densenet121(other)
    nih_sized = tmp_path / "fourteen_classes.pt"
    torch.save(DenseNet(num_classes=14).state_dict(), nih_sized)
    with pytest.raises(ValueError, match="wrong shape 2"):
        load_xrv_densenet121(nih_sized)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"<html>404</html>")
    with pytest.raises(ValueError):
        load_xrv_densenet121(garbage)


class _Payload:
    """Unpickling it would call ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "payload.pt"
    torch.save({"features.conv0.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError):
        load_xrv_densenet121(path)
    assert not marker.exists()
