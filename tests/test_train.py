"""The training loop end to end, as users run it: `megasmol train` in fresh processes.

Each run is the real stack (Megatron DDP, distributed optimizer, pipeline schedules,
dist_checkpointing) on a 4-layer model with a 512-token vocabulary.
"""

import json
import random
import signal
import subprocess

import pytest

from megasmol.ckpt.checkpoint import read_metadata
from tests.conftest import cli_in_process
from tests.train_fixtures import (
    kill_session,
    start_train,
    step_losses,
    torchrun_train,
    train,
    wait_for_step,
    write_training_run,
)

STEPS = 20


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted TP=1 run that starts from a saved initial checkpoint: a checkpoint every
    5 steps, the last 3 kept (the TP=2 test resumes step 10's), each announced by a command."""
    root = tmp_path_factory.mktemp("reference")
    config = write_training_run(root, steps=STEPS, checkpoint={
        "keep_last": 3, "post_save_command": f"echo {{step}} {{path}} >> {root / 'uploads.txt'}"})
    assert cli_in_process("init", "--spec", str(root / "spec.yaml"), "--out", str(root / "init"),
                          "--seed", "3").returncode == 0
    proc = train(config, f"checkpoint.init_from={root / 'init'}")
    return {"root": root, "config": config, "losses": step_losses(root / "run"),
            "grad_norms": step_losses(root / "run", "grad_norm"), "stdout": proc.stdout}


def test_reference_run_learns_and_checkpoints(reference):
    losses = reference["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(losses[s] for s in range(16, 21)) / 5 < sum(losses[s] for s in range(1, 6)) / 5 - 0.1
    ckpts = reference["root"] / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000020"
    # post_save_command ran after each save, with its step and path; keep_last pruned the rest.
    uploads = [line.split() for line in (reference["root"] / "uploads.txt").read_text().splitlines()]
    assert uploads == [[str(step), str(ckpts / f"iter_{step:07d}")] for step in (5, 10, 15, 20)]
    kept = sorted(p.name for p in ckpts.glob("iter_*"))
    assert kept == ["iter_0000010", "iter_0000015", "iter_0000020"]
    meta = read_metadata(ckpts)
    assert meta["train_state"]["step"] == STEPS
    assert meta["run_config"]["training"]["train_steps"] == STEPS  # the resolved config
    assert "validation at step 10" in reference["stdout"] and "validation at step 20" in reference["stdout"]
    records = [json.loads(x) for x in (reference["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_device", "step_time_s",
                "memory_gb", "skipped_steps", "nan_steps", "eta_s"):
        assert key in train[0], key
    assert train[2]["lr"] == pytest.approx(1e-2) and train[-1]["lr"] == 0.0  # warmup 3, decay to 0


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_after_sigkill_is_bitwise_exact(reference, tmp_path, async_save):
    # With async saves, files are written by a background process while training goes on.
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"async_save": async_save})
    init = f"checkpoint.init_from={reference['root'] / 'init'}"
    kill_after = random.Random().randint(7, 17)  # any step: before or after a checkpoint
    proc = start_train(config, init)
    # An async save commits a few steps after it starts: kill once one is complete, at any step.
    wait_for_step(proc, tmp_path / "run", kill_after, committed=True)
    kill_session(proc)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    killed_at = max(step_losses(tmp_path / "run"))
    assert killed_at < STEPS
    resumed = train(config, init)
    assert "resumed from" in resumed.stdout
    assert step_losses(tmp_path / "run") == reference["losses"]  # every step, bit for bit


@pytest.mark.parametrize("async_save", [False, True])
def test_kill_during_save_keeps_previous_latest(reference, tmp_path, async_save):
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"async_save": async_save})
    init = f"checkpoint.init_from={reference['root'] / 'init'}"
    crashed = start_train(config, init, env_extra={"MEGASMOL_FAULT": "kill_in_save:10"})
    crashed.wait(timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    kill_session(crashed)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000005"
    assert (ckpts / "iter_0000010.partial").is_dir() and not (ckpts / "iter_0000010").exists()
    resumed = train(config, init)
    assert "removed the interrupted save iter_0000010.partial" in resumed.stdout
    assert "at step 5" in resumed.stdout
    assert not (ckpts / "iter_0000010.partial").exists()
    assert step_losses(tmp_path / "run") == reference["losses"]


def test_bf16_run_resumes_exactly(reference, tmp_path):
    """bf16 (Float16Module, fp32 master weights in the distributed optimizer) saves and resumes:
    a run killed while saving step 10 resumes from step 5 and trains steps 6-10 again with the
    losses it logged the first time, bit for bit. (The killed run's first pass is the
    uninterrupted run up to step 10: no second bf16 run to compare with.)"""
    init = f"checkpoint.init_from={reference['root'] / 'init'}"
    config = write_training_run(tmp_path, steps=12, eval={"interval": 0})
    crashed = start_train(config, init, "training.precision=bf16",
                          env_extra={"MEGASMOL_FAULT": "kill_in_save:10"})
    crashed.wait(timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    kill_session(crashed)
    first = step_losses(tmp_path / "run")
    assert sorted(first) == list(range(1, 11))
    resumed = train(config, init, "training.precision=bf16")
    assert "at step 5" in resumed.stdout
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    again = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"][len(first):]
    assert [step for step, _ in again] == list(range(6, 13))
    assert [loss for step, loss in again if step <= 10] == [first[s] for s in range(6, 11)]
    assert again[-1][1] < first[1] - 0.2  # and bf16 learns


def test_sigterm_saves_and_exits_then_resumes(reference, tmp_path):
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 0})
    init = f"checkpoint.init_from={reference['root'] / 'init'}"
    proc = start_train(config, init)
    wait_for_step(proc, tmp_path / "run", 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    stopped = read_metadata(tmp_path / "run" / "checkpoints")["train_state"]["step"]
    assert 4 <= stopped < STEPS
    train(config, init)
    assert step_losses(tmp_path / "run") == reference["losses"]


@pytest.mark.parametrize("layout", ["parallel.pipeline_parallel=2", "optim.distributed=true",
                                    "parallel.context_parallel=2"])
def test_two_process_layouts_match_single_process(reference, tmp_path, layout):
    """Each layout from the initial checkpoint, all 20 steps (TP=2: the resume test below)."""
    # One save, at the end (the PP checkpoint is exported below): the periodic ones are the
    # resume tests' concern, and each costs every rank a checkpoint write.
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 0})
    torchrun_train(config, layout, f"checkpoint.init_from={reference['root'] / 'init'}")
    _matches_the_reference(reference, tmp_path / "run", range(1, STEPS + 1))
    if layout.startswith("parallel.pipeline"):
        _exports_with_logit_parity(tmp_path / "run" / "checkpoints", tmp_path / "hf", layout)


def _matches_the_reference(reference, run_dir, steps):
    """The run's losses and clipped gradient norms at ``steps`` are the reference's (TP=1)."""
    losses, norms = step_losses(run_dir), step_losses(run_dir, "grad_norm")
    assert sorted(losses) == list(steps)
    for step in steps:
        assert losses[step] == pytest.approx(reference["losses"][step], rel=2e-4, abs=1e-4), step
        # The clipped gradient norm must count every shard once, or clipping differs by layout.
        assert norms[step] == pytest.approx(reference["grad_norms"][step], rel=1e-3), step


def _exports_with_logit_parity(checkpoint, out, layout):
    """A checkpoint written by the TP=2 / PP=2 run loads in one process and exports to
    transformers with the same logits (float32, relative error < 1e-5)."""
    import torch

    from megasmol.convert.export import export_hf
    from megasmol.model.load import load_checkpoint_model
    from tests.test_convert import hf_model, megatron_logits, relative_error

    export_hf(checkpoint, out, show_progress=False)
    model, spec, meta = load_checkpoint_model(checkpoint)
    assert meta["written_with"][layout.split(".")[1].split("=")[0]] == 2
    ids = torch.randint(0, spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    assert relative_error(megatron_logits(model, ids), hf_model(out)(ids).logits) < 1e-5


def test_tensor_parallel_resumes_a_tp1_checkpoint_as_the_same_run(reference, tmp_path):
    """A TP=1 checkpoint (model + optimizer) resumed with TP=2 continues the same run: the
    reference's losses and gradient norms for steps 11-20, and the TP=2 checkpoint exports with
    logit parity. (The TP=2 layout test: one torchrun run for both.)"""
    layout = "parallel.tensor_parallel=2"
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 0})
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    src = reference["root"] / "run" / "checkpoints" / "iter_0000010"
    subprocess.run(["cp", "-r", str(src), str(ckpts / src.name)], check=True)
    (ckpts / "latest").write_text("iter_0000010\n")
    proc = torchrun_train(config, layout)
    assert "resumed from" in proc.stdout
    _matches_the_reference(reference, tmp_path / "run", range(11, STEPS + 1))
    _exports_with_logit_parity(ckpts, tmp_path / "hf", layout)


def test_init_from_loads_weights_but_starts_fresh_and_batch_rampup_grows_the_batch(reference, tmp_path):
    """Two settings of a run's start, in one run: ``init_from`` (the trained weights, a new
    schedule and data position) and ``training.batch_rampup`` (the batch grows by steps)."""
    trained = reference["root"] / "run" / "checkpoints"
    config = write_training_run(tmp_path, steps=8, checkpoint={"interval": 0},
                                eval={"interval": 0})
    train(config, f"checkpoint.init_from={trained}",
          "training.batch_rampup={start: 4, increment: 2, steps: 4}")
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 9))  # a new schedule and data position
    assert losses[1] < reference["losses"][1] - 0.1  # but the trained weights
    assert read_metadata(tmp_path / "run" / "checkpoints")["train_state"]["step"] == 8
    tokens = step_losses(tmp_path / "run", "tokens")
    assert [tokens[s] // 64 for s in range(1, 9)] == [4, 4, 6, 6, 8, 8, 8, 8]


@pytest.mark.parametrize("policy", ["skip", "rollback"])  # "log" applies: test_callbacks' guard test
def test_planted_spike_is_handled_per_policy(reference, tmp_path, policy):
    config = write_training_run(tmp_path, steps=STEPS, spikes={"policy": policy, "window": 8,
                                                               "warmup_steps": 5, "threshold": 3.0},
                                checkpoint={"interval": 10})  # rollback's target: iter_0000010
    proc = train(config, f"checkpoint.init_from={reference['root'] / 'init'}",
                  env_extra={"MEGASMOL_FAULT": "corrupt_batch:13"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    spikes = [r for r in records if r["kind"] == "spike"]
    assert [r["step"] for r in spikes] == [13] and "loss spike: step 13" in proc.stdout
    losses = step_losses(tmp_path / "run")
    ref = reference["losses"]
    assert all(losses[s] == ref[s] for s in range(1, 13))
    if policy == "log":  # the corrupted batch was trained on: later steps differ
        assert losses[14] != ref[14]
    if policy == "skip":  # no update from step 13, so step 14 differs only by step 13's update
        assert losses[14] != ref[14] and 14 in losses
    if policy == "rollback":  # back to step 10, data of 11..13 skipped, never trained on
        assert "rolled back to iter_0000010" in proc.stdout
        assert 11 not in losses or losses[11] == ref[11]
        meta = read_metadata(tmp_path / "run" / "checkpoints")
        assert [11, 13] in meta["train_state"]["skip_batches"]
        assert json.loads((tmp_path / "run" / "result.json").read_text())["rollbacks"] == 1


def test_skip_batches_skips_data_deterministically(reference, tmp_path):
    config = write_training_run(tmp_path, steps=STEPS, spikes={"skip_batches": [[6, 8]]},
                                checkpoint={"interval": 0})
    train(config, f"checkpoint.init_from={reference['root'] / 'init'}")
    losses = step_losses(tmp_path / "run")
    assert not {6, 7, 8} & set(losses)
    assert all(losses[s] == reference["losses"][s] for s in range(1, 6))
    assert losses[9] != reference["losses"][9]  # three fewer updates before it


def test_bad_configs_fail_before_training_with_the_field_named(tmp_path):
    config = write_training_run(tmp_path, steps=10)
    cases = {
        "training.global_batch_size=7": "global_batch_size",
        "parallel.tensor_parallel=3": "tensor_parallel",
        "optim.bogus=1": "optim.bogus",
        "schedule.warmup_steps=50": "warmup_steps",
        "optim.beta2=1.5": "optim.beta2",
    }
    for override, field in cases.items():
        proc = train(config, override, check=False)
        assert proc.returncode == 2, (override, proc.stdout, proc.stderr)
        assert field in proc.stderr and "Traceback" not in proc.stderr, (override, proc.stderr)
    # Found once Megatron-Core is loaded (5 s of imports in a process of its own): run by the
    # CLI's main in this process (an exception it let through would fail the test).
    proc = cli_in_process("train", "--config", str(config), "--set", "data.recipe=missing.yaml")
    assert proc.returncode == 2 and "missing" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

