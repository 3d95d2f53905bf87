"""common.engines.resume: finding the last checkpoint and restoring it safely."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from common.engines.resume import latest_checkpoint
from common.io.weights import load_weights, sha256sum
from tests.conftest import assert_same_weights, make_tiny_net


class _NotAWeight:
    pass


def _trainer(net: torch.nn.Module, optimizer: torch.optim.Optimizer, max_epochs: int) -> tuple[Engine, list[int]]:
    """A tiny ignite trainer that records the epochs it runs."""

    def step(engine, batch):
        optimizer.zero_grad()
        loss = net(batch).sum()
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    epochs: list[int] = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
    engine.state.max_epochs = max_epochs  # as MONAI's trainers set it before run()
    return engine, epochs


def _saved_run(tmp_path, epochs: int = 2) -> tuple[str, torch.nn.Module, torch.optim.Optimizer]:
    from monai.handlers import CheckpointSaver

    net = make_tiny_net(1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    engine, _ = _trainer(net, optimizer, epochs)
    save = {"net": net, "optimizer": optimizer, "trainer": engine}
    CheckpointSaver(str(tmp_path), save, save_interval=1, n_saved=1).attach(engine)
    engine.run([torch.ones(1, 4)], max_epochs=epochs)
    return latest_checkpoint(tmp_path), net, optimizer


def test_latest_checkpoint_picks_the_highest_step_numerically(tmp_path):
    for step in (2, 10, 9):
        torch.save({}, tmp_path / f"checkpoint_epoch={step}.pt")
    (tmp_path / "events.out.tfevents.1").write_text("")
    (tmp_path / "checkpoint_notes.pt").write_text("")  # no step: ignored
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")


def test_latest_checkpoint_prefix(tmp_path):
    torch.save({}, tmp_path / "ae_checkpoint_epoch=7.pt")
    torch.save({}, tmp_path / "ldm_checkpoint_epoch=3.pt")
    assert latest_checkpoint(tmp_path, prefix="ldm") == str(tmp_path / "ldm_checkpoint_epoch=3.pt")
    assert latest_checkpoint(tmp_path, prefix="ae") == str(tmp_path / "ae_checkpoint_epoch=7.pt")
    assert latest_checkpoint(tmp_path, prefix="vae") is None


def test_latest_checkpoint_fresh_run(tmp_path):
    assert latest_checkpoint(tmp_path) is None  # empty
    assert latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "model.pt").write_text("")
    assert latest_checkpoint(tmp_path) is None


def test_latest_checkpoint_finds_what_monai_checkpoint_saver_writes(tmp_path):
    """The bundles save several objects per checkpoint: MONAI names the files ``checkpoint_epoch=N.pt``."""
    from monai.handlers import CheckpointSaver

    net = make_tiny_net()
    save_dict = {"net": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)}
    engine = Engine(lambda engine, batch: None)
    CheckpointSaver(str(tmp_path), save_dict, save_interval=1, n_saved=2).attach(engine)
    engine.run([0], max_epochs=3)
    found = latest_checkpoint(tmp_path)
    assert found == str(tmp_path / "checkpoint_epoch=3.pt")
    assert set(load_weights(found)) == {"net", "optimizer"}


def test_safe_checkpoint_loader_resumes_at_the_next_epoch(tmp_path):
    from common.engines.resume import SafeCheckpointLoader

    path, trained, trained_opt = _saved_run(tmp_path, epochs=2)
    net = make_tiny_net(7)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    engine, epochs = _trainer(net, optimizer, max_epochs=4)
    loader = SafeCheckpointLoader(
        load_path=path,
        load_dict={"net": net, "optimizer": optimizer, "trainer": engine},
        map_location="cpu",
        sha256=sha256sum(path),
    )
    loader.attach(engine)
    restored = {}
    engine.add_event_handler(
        Events.STARTED, lambda e: restored.update(weights={k: v.clone() for k, v in net.state_dict().items()})
    )
    engine.run([torch.ones(1, 4)], max_epochs=4)
    assert epochs == [3, 4], "the resumed run continues after the checkpoint's epoch"
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(restored["weights"][key], value, rtol=0, atol=0)
    assert optimizer.state_dict()["state"], "the optimizer state (momentum) is restored"
    assert engine.state.max_epochs == 4


def test_safe_checkpoint_loader_logs_like_monai(tmp_path, caplog):
    from common.engines.resume import SafeCheckpointLoader

    path, _, _ = _saved_run(tmp_path, epochs=1)
    net = make_tiny_net()
    engine, _ = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), max_epochs=1)
    SafeCheckpointLoader(path, {"net": net}, name="resume").attach(engine)
    with caplog.at_level("INFO", logger="resume"):
        engine.run([torch.ones(1, 4)], max_epochs=1)
    assert f"Restored all variables from {path}" in caplog.text


def test_safe_checkpoint_loader_bare_state_dict(weights_file):
    from common.engines.resume import SafeCheckpointLoader

    net = make_tiny_net(3)
    engine, _ = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), max_epochs=1)
    SafeCheckpointLoader(str(weights_file), {"net": net})(engine)
    assert_same_weights(net, make_tiny_net(1))


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("truncate", ValueError, "not a readable PyTorch weights file"),
        ("foreign", ValueError, "not a readable PyTorch weights file"),
        ("checksum", ValueError, "Checksum mismatch"),
        ("missing_key", KeyError, "has no ['discriminator']"),
        ("pickle", ValueError, "not a state dict"),
    ],
)
def test_safe_checkpoint_loader_refuses_bad_files(tmp_path, damage, error, message):
    from common.engines.resume import SafeCheckpointLoader

    path, _, _ = _saved_run(tmp_path / "run", epochs=1)
    sha = None
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "foreign":
        open(path, "w").write("<html>404</html>")
    elif damage == "checksum":
        sha = "0" * 64
    elif damage == "pickle":
        torch.save({"net": make_tiny_net().state_dict(), "payload": _NotAWeight()}, path)
    net = make_tiny_net()
    engine, _ = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), max_epochs=2)
    load_dict = {"net": net, "trainer": engine}
    if damage == "missing_key":
        load_dict["discriminator"] = make_tiny_net()
    with pytest.raises(error) as info:
        SafeCheckpointLoader(path, load_dict, sha256=sha)(engine)
    assert message in str(info.value) and str(path) in str(info.value)


def test_safe_checkpoint_loader_refuses_a_checkpoint_past_max_epochs(tmp_path):
    from common.engines.resume import SafeCheckpointLoader

    path, _, _ = _saved_run(tmp_path, epochs=3)
    net = make_tiny_net()
    engine, _ = _trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), max_epochs=2)
    with pytest.raises(ValueError, match="beyond this run's max_epochs"):
        SafeCheckpointLoader(path, {"net": net, "trainer": engine})(engine)


def test_safe_checkpoint_loader_in_a_bundle_config(tmp_path):
    """The handler is what the train configs name; MONAI's config parser builds it like CheckpointLoader."""
    from monai.bundle import ConfigParser

    path, _, _ = _saved_run(tmp_path, epochs=1)
    parser = ConfigParser(
        {
            "net": "$torch.nn.Linear(4, 3)",
            "loader": {
                "_target_": "common.engines.resume.SafeCheckpointLoader",
                "load_path": path,
                "load_dict": {"net": "@net"},
                "map_location": "$torch.device('cpu')",
                "strict": False,
            },
        }
    )
    loader = parser.get_parsed_content("loader")
    assert loader.load_path == path and loader.sha256 is None


def _amp_trainer(init_scale: float):
    """A MONAI SupervisedTrainer with a real, enabled GradScaler on the CPU (what amp=True gives on a GPU)."""
    from monai.engines import SupervisedTrainer

    net = make_tiny_net(3)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=[{"image": torch.ones(1, 4), "label": torch.zeros(1, 2)}],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.MSELoss(),
    )
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer


def test_amp_scaler_is_checkpointed_and_restored(tmp_path):
    """A resumed AMP run keeps the loss scale it had reached instead of starting again from 65536.

    MONAI's trainer makes a new GradScaler when ``run()`` starts; SafeCheckpointLoader restores at STARTED, after it.
    """
    from common.engines.resume import GradScalerState, SafeCheckpointLoader

    trained = _amp_trainer(init_scale=1024.0)
    trained.scaler.scale(torch.ones(()))  # the scale is made lazily, at the first scaled loss
    trained.scaler.update(new_scale=256.0)  # where a run had backed off to
    objects = {"trainer": trained, "amp_scaler": GradScalerState(trained)}
    path = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({name: obj.state_dict() for name, obj in objects.items()}, path)  # what ignite's Checkpoint saves
    assert load_weights(path)["amp_scaler"]["scaler"]["scale"] == 256.0

    resumed = _amp_trainer(init_scale=65536.0)
    loader = SafeCheckpointLoader(path, {"trainer": resumed, "amp_scaler": GradScalerState(resumed)})
    loader(resumed)
    assert resumed.scaler.get_scale() == 256.0


def test_checkpoints_without_amp_or_from_before_resume(tmp_path, caplog):
    from common.engines.resume import GradScalerState, SafeCheckpointLoader

    trainer = _amp_trainer(init_scale=1024.0)
    path = tmp_path / "old.pt"
    torch.save({"trainer": trainer.state_dict()}, path)  # written before scalers were checkpointed
    with caplog.at_level("WARNING"):
        SafeCheckpointLoader(str(path), {"trainer": trainer, "amp_scaler": GradScalerState(trainer)}, name="t")(trainer)
    assert "has no 'amp_scaler'" in caplog.text and trainer.scaler.get_scale() == 1024.0
    torch.save({"trainer": trainer.state_dict(), "amp_scaler": {}}, path)  # a CPU run without AMP
    SafeCheckpointLoader(str(path), {"trainer": trainer, "amp_scaler": GradScalerState(trainer)})(trainer)
    assert trainer.scaler.get_scale() == 1024.0
