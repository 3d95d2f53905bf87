"""tools/train_finding_classifier.py: trains the phantom chest X-ray finding classifier and writes its weights."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.cxr.phantoms import write_cxr_phantom_dataset
from common.evaluation.findings import FINDING_LABELS, FindingClassifier
from common.io.weights import load_weights
from common.networks.architecture import load_network
from common.networks.feature_extractors import build_feature_extractor
from tools import train_finding_classifier as tool

TINY = {"epochs": 2, "batch_size": 4, "channels": (4, 4, 8, 8), "depths": (1, 1, 1, 1), "num_threads": 1}
# The tiny validation and test splits hold one class of most findings: their AUROC is None, said by a warning.
pytestmark = pytest.mark.filterwarnings("ignore:AUROC of .* is undefined")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """16 phantom radiographs of 32 x 32 (8 patients, 2 studies each): 8 training, 4 validation, 4 test images."""
    root = tmp_path_factory.mktemp("cxr")
    write_cxr_phantom_dataset(root, num_patients=8, size=32, val_fraction=0.25, test_fraction=0.25, progress=False)
    return root


def test_images_load_as_monai_does_columns_first(tmp_path):
    """The documented layout: a PNG pixel at (row 0, column 5) lands at (0, 5, 0) of the (1, W, H) image."""
    pixels = np.zeros((32, 48), dtype=np.uint8)
    pixels[0, 5] = 255
    Image.fromarray(pixels, mode="L").save(tmp_path / "a.png")
    images, targets = tool.load_arrays([{"image": str(tmp_path / "a.png"), "target": torch.zeros(6)}])
    assert images.shape == (1, 1, 48, 32) and images.dtype == torch.float32
    assert images[0, 0, 5, 0] == 1.0 and images.sum() == 1.0 and targets.shape == (1, 6)


def test_augmentation_never_mirrors():
    assert not any("Flip" in type(t).__name__ for t in tool.augment_transforms())


def test_trains_and_writes_a_loadable_classifier(phantoms, tmp_path, capsys):
    out = tmp_path / "classifier.pt"
    result = tool.train_finding_classifier(dataset_dir=str(phantoms), output=str(out), **TINY)
    printed = capsys.readouterr().out
    assert "Validation AUROC" in printed and "Test AUROC" in printed
    assert set(result["validation_auroc"]) == set(result["test_auroc"]) == set(FINDING_LABELS)
    assert result["epoch"] in (1, 2) and result["output"] == str(out)

    state = load_weights(out)
    assert state["architectures"]["feature_network"]["network"] == "PhantomFeatureNet"
    assert state["provenance"] == {"demo": True, "trained_on": str(phantoms)}
    assert state["targets"] == list(FINDING_LABELS) and state["outputs"] == "logits"
    assert state["image_size"] == [32, 32]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind

    images = torch.rand(3, 1, 32, 32)
    probabilities = FindingClassifier.from_weights(out)(images)
    assert probabilities.shape == (3, len(FINDING_LABELS)) and ((probabilities >= 0) & (probabilities <= 1)).all()
    rebuilt = load_network(out, "feature_network").eval()  # from the architecture record alone
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(rebuilt(images)), probabilities)
    assert build_feature_extractor("phantom", str(out))(images).shape == (3, 8)  # FID features, D = 8


def test_refuses_to_overwrite_before_any_work(phantoms, tmp_path, monkeypatch, capsys):
    out = tmp_path / "classifier.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        tool.train_finding_classifier(dataset_dir=str(tmp_path / "no_data"), output=str(out), **TINY)
    assert out.read_bytes() == b"keep me"

    monkeypatch.setattr(sys, "argv", ["train_finding_classifier", "--dataset_dir", str(phantoms), "--output", str(out)])
    with pytest.raises(SystemExit) as info:
        tool.cli()
    assert info.value.code == 2 and "exists: pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"

    tool.train_finding_classifier(dataset_dir=str(phantoms), output=str(out), overwrite=True, **{**TINY, "epochs": 1})
    assert load_weights(out)["epoch"] == 1
