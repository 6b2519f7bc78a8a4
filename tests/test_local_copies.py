"""Local copies of the training state (``resilience.local_checkpoint_every``, ``train/local_copies.py``)
in one gloo process, through NVRx's ``LocalCheckpointManager``: the loop keeps one every N steps; a
resume takes the copy only where it is newer than the latest checkpoint, says which, and goes on
exactly as the run did; a rollback drops the newer copies; a launch removes its own copies and
what earlier launches of the run left. (Under a real fault, 2 ranks: tests/test_inprocess_restart.py.)"""

import pytest


@pytest.fixture
def trainer(tmp_path):
    from megasmol.config.run import load_run_config
    from megasmol.train.local_copies import LocalCopies
    from megasmol.train.loop import Trainer
    from megasmol.train.setup import build_setup
    from tests.conftest import ensure_megatron_runtime
    from tests.train_fixtures import write_training_run

    ensure_megatron_runtime()
    path = write_training_run(tmp_path, steps=6, checkpoint={"interval": 0, "keep_last": 0},
                              training={"collective_timeout_s": 20},
                              resilience={"in_process_restart": True, "local_checkpoint_every": 2,
                                          "local_checkpoint_dir": str(tmp_path / "node-local")})
    config = load_run_config(path)
    setup = build_setup(config, audit=False)
    trainer = Trainer(setup, local=LocalCopies(config, setup, "test"))
    yield trainer
    trainer.close()


def _weights(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.s.model.named_parameters()}


def _adam_moments(trainer) -> list:
    optimizer = trainer.s.optimizer
    return [state[key].clone() for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            for state in inner.optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]


def test_a_resume_takes_the_newer_local_copy_and_goes_on_exactly_as_the_run_did(trainer):
    import torch

    trainer.run_steps(until=4)  # copies after steps 2 and 4; the manager keeps the newest
    weights, moments = _weights(trainer), _adam_moments(trainer)
    trainer.run_steps(until=5)
    first_loss_5 = trainer.result.last_losses[5]
    assert any(not torch.equal(weights[n], p) for n, p in _weights(trainer).items())  # it moved on

    assert trainer._resume_from_local_copy(latest=None)
    assert trainer.state.step == 4 and trainer.resumed_source == "local copy"
    assert all(torch.equal(weights[n], p) for n, p in _weights(trainer).items())
    assert len(moments) > 0 and all(torch.equal(a, b) for a, b in zip(moments, _adam_moments(trainer)))
    trainer.run_steps(until=5)
    assert trainer.result.last_losses[5] == first_loss_5  # the same step again, bit for bit


def test_the_latest_checkpoint_wins_where_it_is_as_new_or_newer(trainer):
    trainer.run_steps(until=3)  # a copy of step 2
    trainer.save("interval")  # the checkpoint of step 3
    assert trainer.local.newest() == 2
    assert not trainer._resume_from_local_copy(trainer.checkpoints.latest())
    assert trainer.resumed_source == "latest checkpoint" and trainer.state.step == 3
    trainer.run_steps(until=4)  # a copy of step 4, the checkpoint still of step 3
    assert trainer.local.newest() == 4
    trainer.run_steps(until=6)
    trainer.save("interval")  # the checkpoint of step 6, as new as the copy of step 6
    assert trainer.local.newest() == 6
    assert not trainer._resume_from_local_copy(trainer.checkpoints.latest())


def test_a_rollback_drops_the_copies_it_goes_back_before(trainer):
    trainer.run_steps(until=4)
    folder = trainer.local.manager.local_ckpt_dir
    assert [p.name for p in folder.iterdir()] == ["iter_0000004_0_local.pt"]
    (folder / "iter_0000006_0_local.dirty.pt").write_bytes(b"")  # a write a fault cut short
    trainer.local.drop_after(4)
    assert [p.name for p in folder.iterdir()] == ["iter_0000004_0_local.pt"]
    trainer.local.drop_after(3)
    assert list(folder.iterdir()) == [] and trainer.local.newest() is None
    assert not trainer._resume_from_local_copy(latest=None) and trainer.resumed_source == ""


def test_a_launch_removes_its_copies_and_what_earlier_launches_of_the_run_left(trainer):
    from megasmol.train.local_copies import remove, remove_stale, run_root

    trainer.run_steps(until=2)
    config = trainer.config
    root = run_root(config)
    assert trainer.local.manager.local_ckpt_dir.parent == root / "launch-test"
    (root / "launch-killed" / "0").mkdir(parents=True)
    remove_stale(config, "test")
    assert sorted(p.name for p in root.iterdir()) == ["launch-test"]
    remove(config, "test")
    assert not root.exists() and root.parent.is_dir()  # the node-local directory itself stays
