"""common.io.weights: safe loading of weight files."""

from __future__ import annotations

import hashlib

import pytest
import torch

from common.io.weights import load_network, load_state, load_weights, sha256sum
from tests.conftest import assert_same_weights, make_tiny_net


class _NotAWeight:
    pass


def test_sha256sum(weights_file):
    assert sha256sum(weights_file) == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert sha256sum(weights_file, chunk=7) == sha256sum(weights_file)


def test_load_weights(weights_file):
    state = load_weights(weights_file)
    assert set(state) == set(make_tiny_net().state_dict())


def test_missing_file_says_how_to_get_it(tmp_path):
    how = "Run `python -m monai.bundle download brain_t1_ldm` or train it with configs/train_autoencoder.json."
    with pytest.raises(FileNotFoundError) as err:
        load_weights(tmp_path / "models" / "autoencoder.pt", how_to_get=how)
    assert "autoencoder.pt" in str(err.value)
    assert how in str(err.value)
    with pytest.raises(FileNotFoundError, match="Weights file not found"):
        load_weights(tmp_path)  # a directory is not a weights file


def test_checksum(weights_file):
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert load_weights(weights_file, sha256=digest)
    assert load_weights(weights_file, sha256=digest.upper())  # as large_files.yml may spell it
    with pytest.raises(ValueError, match="Checksum mismatch") as err:
        load_weights(weights_file, sha256="0" * 64)
    assert digest in str(err.value) and "0" * 64 in str(err.value)


def test_truncated_file(weights_file):
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        load_weights(weights_file)


def test_foreign_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("<html>404 Not Found</html>")  # what a failed download often leaves
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        load_weights(path)


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: arbitrary pickled objects are never unpickled."""
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": _NotAWeight()}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights(path)


@pytest.mark.parametrize("obj", [torch.zeros(3), [torch.zeros(3)], 1.5])
def test_non_dict_is_rejected(tmp_path, obj):
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match="not a dict of weights"):
        load_weights(path)


def test_load_network_from_a_plain_state_dict(weights_file):
    net = load_network(make_tiny_net(2), weights_file)
    assert_same_weights(net, make_tiny_net(1))


def test_load_network_with_key(tmp_path):
    path = tmp_path / "diffusion.pt"
    torch.save({"unet": make_tiny_net(1).state_dict(), "scheduler": {"num_train_timesteps": 1000}}, path)
    net = make_tiny_net(2)
    assert load_network(net, path, key="unet") is net
    assert_same_weights(net, make_tiny_net(1))
    with pytest.raises(KeyError, match="scheduler") as err:
        load_network(make_tiny_net(2), path, key="autoencoder")
    assert "autoencoder" in str(err.value)


def test_load_network_passes_checksum_and_hint(weights_file, tmp_path):
    with pytest.raises(ValueError, match="Checksum mismatch"):
        load_network(make_tiny_net(), weights_file, sha256="f" * 64)
    with pytest.raises(FileNotFoundError, match="download it"):
        load_network(make_tiny_net(), tmp_path / "nope.pt", how_to_get="download it")


def test_load_network_is_strict(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    with pytest.raises(RuntimeError):
        load_network(make_tiny_net(), path)


def test_load_state(weights_file):
    net = make_tiny_net(2)
    assert load_state(net, load_weights(weights_file)) is net
    assert_same_weights(net, make_tiny_net(1))


def test_a_relative_weights_path_says_how_to_run_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"relative to the current folder .*--bundle_root"):
        load_weights("models/autoencoder.pt")
