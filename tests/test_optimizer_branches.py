"""Muon and AdEMAMix runs (one process, ``optim.distributed`` as by default: the layer-wise
optimizer on one rank): each trains, resumes bit for bit and averages; Muon's branches.

Each checkpoint holds every state of its optimizer (Muon's momentum and its AdamW's moments,
AdEMAMix's three moments). A branch takes the source's model AND optimizer state tensor for tensor
and decays from the source's LR; an average of two checkpoints of such a run starts a new one
(weights only).
"""

import pytest

from megasmol.ckpt.reader import CheckpointReader
from tests.test_branch import _branch_config, _train_lrs
from tests.train_fixtures import resumed_from, step_losses, train, write_training_run

STATES = {"muon": ("momentum_buffer", "exp_avg"), "ademamix": ("exp_avg", "exp_avg_slow")}
"""State names each optimizer's checkpoint must carry (Muon's AdamW half has Adam's)."""


SECTIONS = dict(schedule={"decay_fraction": 0.5, "warmup_steps": 1},
                checkpoint={"interval": 2, "keep_last": 0}, eval={"interval": 0})


@pytest.fixture(scope="module", params=sorted(STATES))
def source(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    config = write_training_run(root, steps=8, optim={"name": request.param, "distributed": True},
                                **SECTIONS)
    train(config)
    return request.param, root


def test_it_trains_and_resumes_bit_for_bit(source):
    name, root = source
    keys = CheckpointReader(root / "run" / "checkpoints" / "iter_0000004").keys()
    for state in STATES[name]:
        assert any(f"optimizer.state.{state}." in k for k in keys), state  # chained_i. prefix
    losses = step_losses(root / "run")
    assert sorted(losses) == list(range(1, 9))
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2 - 0.05, losses
    resumed = resumed_from(root / "run", "iter_0000004", root / "resumed", steps=8,
                           optim={"name": name, "distributed": True}, **SECTIONS)
    assert "resumed from" in train(resumed).stdout
    assert step_losses(root / "resumed" / "run") == {s: losses[s] for s in range(5, 9)}


@pytest.mark.parametrize("source", ["muon"], indirect=True)
def test_a_branch_carries_the_optimizer_state_and_anneals(source):
    """Muon's run only: a branch loads the optimizer as a resume does (AdEMAMix's resume above),
    and Muon's checkpoint holds both chained optimizers' states."""
    name, root = source
    # Its first step's data is skipped: no update, so its first checkpoint holds its start.
    out = train(_branch_config(root, "anneal", "run@6", steps=4, spikes={"skip_batches": [[1, 1]]},
                               checkpoint={"interval": 1}))
    assert "branched from" in out.stdout and "its step 6" in out.stdout
    src = CheckpointReader(root / "run" / "checkpoints" / "iter_0000006")
    got = CheckpointReader(root / "anneal" / "checkpoints" / "iter_0000001")
    assert set(got.keys()) == set(src.keys())
    for key in src.keys():
        assert src.read(key).equal(got.read(key)), key

    lrs, source_lrs = _train_lrs(root / "anneal"), _train_lrs(root / "run")
    assert 0 < source_lrs[6] < max(source_lrs.values())  # the source was decaying at step 6
    # Decaying from the source's LR over the branch's 4 steps (step 1's update was skipped).
    assert [round(lrs[s] / source_lrs[6], 6) for s in (2, 3, 4)] == [0.666667, 0.333333, 0.0]
    losses = step_losses(root / "anneal")
    assert sorted(losses) == [2, 3, 4] and losses[4] < step_losses(root / "run")[2]


def test_an_average_of_its_checkpoints_starts_a_run(source, megatron_runtime):
    from megasmol.ckpt.average import average_checkpoints

    name, root = source
    ckpts = root / "run" / "checkpoints"
    average_checkpoints([ckpts / "iter_0000004", ckpts / "iter_0000006"], root / "avg")
    first, second = (CheckpointReader(ckpts / f"iter_000000{s}") for s in (4, 6))
    averaged = CheckpointReader(root / "avg")
    key = next(k for k in first.keys() if k.endswith("linear_fc1.weight") and "optimizer" not in k)
    expected = (first.read(key).double() + second.read(key).double()) / 2
    assert (averaged.read(key).double() - expected).abs().max() < 1e-6
    config = write_training_run(root / "from_avg", steps=2, eval={"interval": 0},
                                checkpoint={"init_from": str(root / "avg")},
                                schedule={"warmup_steps": 1}, optim={"name": name})
    out = train(config)
    assert "weights from" in out.stderr + out.stdout
    assert len(step_losses(root / "from_avg" / "run")) == 2
