"""Annealing branches: ``checkpoint.branch_from`` takes a run's model AND optimizer state at a
step, decays from the LR the source had there, never writes to the source, and resumes exactly."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from megasmol.ckpt.reader import CheckpointReader
from tests.train_fixtures import step_losses, train, write_training_run


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _branch_config(root: Path, name: str, source: str, steps: int, **extra) -> Path:
    config = yaml.safe_load((root / "run.yaml").read_text())
    config.pop("model")  # the branch's spec is its source's
    config["run_dir"] = name
    config["training"]["train_steps"] = steps
    config["schedule"] = {"kind": "decay", "warmup_steps": 0, "min_lr": 0.0}
    config["checkpoint"] = {"interval": 5, "keep_last": 0, "branch_from": source}
    config["eval"] = {"interval": 0}
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    path = root / f"branch-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train_lrs(run_dir: Path) -> dict[int, float]:
    return step_losses(run_dir, key="lr")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("branch")
    # WSD decaying over the second half: the LR at step 15 is half the peak, 5e-3.
    config = write_training_run(root, steps=20, schedule={"decay_fraction": 0.5},
                                checkpoint={"interval": 5, "keep_last": 0},
                                eval={"interval": 0})
    train(config)
    return root


@pytest.fixture(scope="module")
def anneal(source):
    """A branch of the source at step 15 (6 steps), and the source's files before it ran."""
    before = _tree_digest(source / "run")
    out = train(_branch_config(source, "anneal", "run@15", steps=6))
    return out, before


def test_branch_starts_from_the_source_state_and_lr_and_never_writes_to_it(source, anneal):
    out, before = anneal

    # One step whose data is skipped: no update, so its checkpoint holds the branch's start.
    start = _branch_config(source, "start", "run@15", steps=1, spikes={"skip_batches": [[1, 1]]})
    train(start)
    src = CheckpointReader(source / "run" / "checkpoints" / "iter_0000015")
    got = CheckpointReader(source / "start" / "checkpoints")
    model_keys = [k for k in src.keys() if not k.startswith("optimizer.")]
    moment_keys = [k for k in src.keys() if k.startswith("optimizer.state.exp_avg")]
    assert model_keys and len(moment_keys) == 2 * len(model_keys)
    assert set(got.keys()) == set(src.keys())
    for key in src.keys():
        assert src.read(key).equal(got.read(key)), key

    # A real branch: first LR = the source's LR at step 15 (read from its checkpoint), decayed
    # linearly to min_lr at the branch's last step.
    assert "branched from" in out.stdout and "its step 15" in out.stdout
    lrs = _train_lrs(source / "anneal")
    assert lrs[1] == pytest.approx(5e-3, rel=1e-12)
    assert lrs[6] == 0.0
    assert [round(lrs[s] / 5e-3, 6) for s in range(1, 7)] == [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    # Tokens go on from the source's (15 steps x 8 x 64), so compare lines the runs up.
    tokens = step_losses(source / "anneal", key="consumed_tokens")
    assert tokens[1] == 16 * 8 * 64 and tokens[6] == 21 * 8 * 64
    meta = json.loads((source / "anneal/checkpoints/iter_0000006/megasmol.json").read_text())
    assert meta["train_state"]["branch"]["step"] == 15
    assert meta["run_config"]["schedule"]["lr"] == pytest.approx(5e-3)

    # A branch of the branch: its LR at step 5 was 1e-3.
    twice = _branch_config(source, "anneal2", "anneal@5", steps=3)
    train(twice)
    assert _train_lrs(source / "anneal2")[1] == pytest.approx(1e-3, rel=1e-9)

    assert _tree_digest(source / "run") == before, "the source run was written to"


def test_a_branch_resumes_exactly(source, anneal):
    split = _branch_config(source, "split", "run@15", steps=6)
    train(split, "training.stop_after_step=3")
    train(split)  # resumes its own step-3 checkpoint, not the source
    assert step_losses(source / "split") == step_losses(source / "anneal")
    assert _train_lrs(source / "split") == _train_lrs(source / "anneal")


def test_bad_branch_sources_are_named(source):
    from megasmol.config.run import load_run_config
    from megasmol.config.typed import ConfigError
    from megasmol.train.branch import branch_point

    with pytest.raises(ConfigError, match=r"no checkpoint at step 7 \(it has steps \[5, 10, 15, 20\]\)"):
        branch_point(load_run_config(_branch_config(source, "bad1", "run@7", steps=2)))
    with pytest.raises(ConfigError, match="must be a step"):
        branch_point(load_run_config(_branch_config(source, "bad2", "run@last", steps=2)))
    with pytest.raises(ConfigError, match="schedule.kind=decay"):
        load_run_config(_branch_config(source, "bad3", "run@10", steps=2),
                        ["checkpoint.branch_from=null", "model=spec.yaml"])
    with pytest.raises(ConfigError, match="own checkpoint directory"):
        branch_point(load_run_config(_branch_config(source, "run", "run@10", steps=2),
                                     ["checkpoint.resume=false"]))
    with pytest.raises(ConfigError, match="exclude each other"):
        load_run_config(_branch_config(source, "bad4", "run@10", steps=2),
                        ["checkpoint.init_from=run/checkpoints"])


def test_an_average_of_training_checkpoints_starts_a_run(source, megatron_runtime):
    """Averaging the stable phase's checkpoints (weights only) gives a checkpoint init_from takes."""
    from megasmol.ckpt.average import average_checkpoints

    average_checkpoints([source / "run/checkpoints/iter_0000005", source / "run/checkpoints/iter_0000010"],
                        source / "avg")
    # Named for its inputs, not as step 10's iter_0000010; init_from takes the root (its latest).
    assert sorted(p.name for p in (source / "avg").iterdir()) == ["avg_iter_0000005-0000010", "latest"]
    config = write_training_run(source / "from_avg", steps=4, checkpoint={"init_from": str(source / "avg")},
                                eval={"interval": 0}, schedule={"warmup_steps": 1})
    out = train(config)
    assert "weights from" in out.stderr + out.stdout
    assert len(step_losses(source / "from_avg" / "run")) == 4
