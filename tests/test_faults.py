"""Faults that used to lose work on a cluster, each reproduced as it happens there.

Signals to the whole process group (torchrun, Slurm), a signal reaching one rank late, inf
gradients, reruns of a finished run, a frozen or killed peer, hostile post-save paths, a second
trainer on the same run. Every run is ``megasmol train`` on the 4-layer test model.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megasmol.ckpt.checkpoint import read_metadata
from megasmol.config.post_save import shell_line
from megasmol.config.run import load_run_config
from megasmol.config.typed import ConfigError
from megasmol.model.run_spec import run_model_spec
from megasmol.train.callbacks.post_save import run_command
from tests.conftest import REPO, cli_in_process, free_port, run_cli, run_torchrun
from tests.train_fixtures import (
    kill_session,
    start_train,
    step_losses,
    train,
    wait_for_step,
    write_training_run,
)

# The tests marked ``serial`` time a signal's or a peer's effect (a grace, a collective timeout, a
# frozen or lost rank) or signal a running torchrun job from outside: they run alone (see
# Makefile). The rest run with the suite: a process signalled, resumed, or refused while another
# trains, and a signal a rank sends itself at a planted point, assert no time (a loaded machine
# only makes them slower), nor do the injected non-finite gradients, the failed save and the
# config checks.
serial = pytest.mark.serial


STEPS = 12


def _latest_step(run_dir):
    return read_metadata(run_dir / "checkpoints")["train_state"]["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    config = write_training_run(root, steps=STEPS, checkpoint={"interval": 3, "keep_last": 0})
    train(config)
    return {"root": root, "config": config, "losses": step_losses(root / "run")}


def _start_torchrun(config, *sets, env_extra=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "megasmol", "train",
           "--config", str(config), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _worker_pid(config, rank):
    """The pid of the ``megasmol train`` worker of ``rank`` for ``config`` (torchrun gives each
    worker its own session, so signalling torchrun's group does not reach them)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_sigterm_to_the_process_group_saves_then_resumes_exactly(reference, tmp_path):
    """``kill -TERM -PGID`` (how torchrun and Slurm signal): Megatron's checkpoint-writer helper
    process is in that group and used to die first, so the preemption save failed."""
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 3})
    proc = start_train(config)
    wait_for_step(proc, tmp_path / "run", 5, committed=True)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    stopped = max(step_losses(tmp_path / "run"))
    assert _latest_step(tmp_path / "run") == stopped < STEPS
    assert stopped % 3 != 0 or "saved checkpoint" in out  # the save after the signal happened
    train(config)
    assert step_losses(tmp_path / "run") == reference["losses"]


@serial
def test_sigterm_to_torchrun_saves_on_every_rank(tmp_path):
    config = write_training_run(tmp_path, steps=200, checkpoint={"interval": 3})
    proc = _start_torchrun(config)
    try:
        wait_for_step(proc, tmp_path / "run", 5, committed=True)
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun forwards it to its workers' groups
        proc.communicate(timeout=120)
    finally:
        kill_session(proc)
    last = max(step_losses(tmp_path / "run"))
    assert 5 <= _latest_step(tmp_path / "run") == last < 200


@pytest.mark.parametrize("skip", [None, [[8, 9]]], ids=["trained-step", "skipped-step"])
def test_a_signal_on_one_rank_after_the_all_reduce_stops_all_ranks_together(tmp_path, skip):
    """Rank 1 is signalled right after step 7's all-reduce: it must not stop alone (the others
    would start step 8 and wait for it forever); all stop after step 8, trained or skipped."""
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 0},
                                spikes={"skip_batches": skip or []})
    proc = run_torchrun(["-m", "megasmol", "train", "--config", str(config)], timeout=240,
                        env_extra={"MEGASMOL_FAULT": "sigterm_after_reduce:7",
                                   "MEGASMOL_FAULT_RANK": "1"})
    assert "stopped by signal on another rank after step 8" in proc.stdout
    assert _latest_step(tmp_path / "run") == 8


def test_an_inf_gradient_is_not_applied(tmp_path):
    """Finite loss, inf gradient at step 5: the update is skipped exactly as if the step's data
    had been skipped, and the following steps are unchanged by it."""
    faulty = write_training_run(tmp_path / "faulty", steps=10, checkpoint={"interval": 0})
    proc = train(faulty, env_extra={"MEGASMOL_FAULT": "inf_grad:5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 5: non-finite gradient; update skipped" in proc.stdout
    skipped = write_training_run(tmp_path / "skipped", steps=10, checkpoint={"interval": 0},
                                 spikes={"skip_batches": [[5, 5]]})
    train(skipped)
    faulty_losses, skipped_losses = (step_losses(tmp_path / name / "run") for name in ("faulty", "skipped"))
    assert all(faulty_losses[s] == skipped_losses[s] for s in range(6, 11))
    lines = (tmp_path / "faulty" / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=_reject) for line in lines]  # strict JSON
    assert [r["step"] for r in records if r["kind"] == "skipped_update"] == [5]
    assert read_metadata(tmp_path / "faulty" / "run" / "checkpoints")["train_state"]["weights_finite"]


def _reject(name):
    raise ValueError(f"{name} in metrics.jsonl")


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 2},
                                spikes={"max_nonfinite_steps": 3})
    proc = train(config, env_extra={"MEGASMOL_FAULT": "inf_grad:4-12"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "3 consecutive steps (up to 6) had a non-finite gradient" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _latest_step(tmp_path / "run") == 4  # the run stopped inside step 6, before its save
    assert read_metadata(tmp_path / "run" / "checkpoints")["train_state"]["weights_finite"]


def test_non_finite_config_values_are_rejected(tmp_path):
    config = write_training_run(tmp_path, steps=10)
    for override, field in (("schedule.lr=.inf", "schedule.lr"), ("optim.clip_grad=.nan", "optim.clip_grad"),
                            ("spikes.threshold=.nan", "spikes.threshold"),
                            ("training.seed=-1", "training.seed")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_run_config(config, [override])


def test_rerunning_a_finished_run_leaves_its_checkpoint_alone(reference):
    final = reference["root"] / "run" / "checkpoints" / "iter_0000012"
    before = (final.stat().st_ino, sorted(p.name for p in final.iterdir()))
    proc = train(reference["config"])
    assert "saved checkpoint" not in proc.stdout and "resumed from" in proc.stdout
    assert "nothing to train: the run is at step 12 and training.train_steps is 12" in proc.stdout
    assert (final.stat().st_ino, sorted(p.name for p in final.iterdir())) == before


@serial
@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_frozen_or_killed_rank_ends_the_job_with_one_line(tmp_path, fault):
    config = write_training_run(tmp_path, steps=400, checkpoint={"interval": 0},
                                training={"collective_timeout_s": 8})
    proc = _start_torchrun(config)
    try:
        wait_for_step(proc, tmp_path / "run", 3)
        peer, rank0 = _worker_pid(config, 1), _worker_pid(config, 0)
        os.kill(peer, getattr(signal, fault))
        started = time.time()
        while _worker_pid(config, 0) == rank0 and time.time() - started < 120:
            time.sleep(0.1)
        waited = time.time() - started
        if _worker_pid(config, 1):
            os.kill(peer, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc)
    expected = "rank 1 (stopped) stopped answering" if fault == "SIGSTOP" else "lost rank 1 (gone)"
    assert waited < (60 if fault == "SIGSTOP" else 10), waited
    assert "megasmol train: error: rank 0: " in err and expected in err, err[-3000:]


@pytest.mark.parametrize("template", ["echo {step} {path} > OUT", 'echo {step} "{path}" > OUT',
                                      "echo {step} '{path}' > OUT"])
def test_post_save_paths_are_never_shell_syntax(tmp_path, template):
    hostile = tmp_path / "run $(touch PWNED) `touch PWNED2`; touch PWNED3 {step}" / "iter_0000005"
    hostile.mkdir(parents=True)
    out = tmp_path / "out.txt"
    assert run_command(template.replace("OUT", str(out)), hostile, 5, timeout_s=30)
    assert out.read_text() == f"5 {hostile}\n"
    assert not list(tmp_path.glob("PWNED*")) and not list(REPO.glob("PWNED*"))
    assert "$MEGASMOL" not in shell_line("{path}") and "${MEGASMOL_CHECKPOINT}" in shell_line("{path}")


@pytest.mark.parametrize("template", ["bash -c 'echo {path}'", 'sh -c "echo {path}"', "eval echo {path}",
                                      'sbatch --wrap "upload {path}"', "ssh host 'upload {path}'"])
def test_a_nested_shell_never_sees_a_hostile_checkpoint_path(tmp_path, template):
    """Templates that hand the path to a second shell would run a hostile directory name as code:
    such a directory is refused when the config loads, and a plain one passes."""
    from megasmol.config.run import load_run_config
    from megasmol.config.typed import ConfigError

    config = write_training_run(tmp_path, steps=4, checkpoint={"post_save_command": template})
    for hostile in ("run;touch PWNED", "run$(touch PWNED)", "run`touch PWNED`", "run\ntouch PWNED",
                    "my run"):
        with pytest.raises(ConfigError, match="checkpoint.dir .* holds"):
            load_run_config(config, [f"checkpoint.dir={tmp_path / hostile}"])
    assert load_run_config(config, [f"checkpoint.dir={tmp_path}/ok_run-1.5"]).checkpoint.post_save_command
    with pytest.raises(ConfigError, match="post_save_command: No closing quotation"):
        load_run_config(config, ["checkpoint.post_save_command=\"echo 'unbalanced {path}\""])


def test_spaces_and_letters_of_any_script_pass_where_the_path_stays_one_word(tmp_path):
    """A space or a non-ASCII letter in checkpoint.dir used to be refused with any post-save
    command: letters of any script are never shell syntax, and a space is safe unless the command
    hands the path to a second shell, which is refused in one line saying which and what to do."""
    config = write_training_run(tmp_path, steps=4, checkpoint={"post_save_command": "echo {path}"})
    plain = tmp_path / "my run" / "Prüfung-日本"
    for template in ("echo {step} {path} > OUT", 'echo {step} "{path}" > OUT',
                     "echo {step} '{path}' > OUT"):
        out = tmp_path / "out.txt"
        loaded = load_run_config(config, [f"checkpoint.post_save_command={template}",
                                          f"checkpoint.dir={plain}"])
        assert loaded.checkpoint_dir == plain
        assert run_command(template.replace("OUT", str(out)), plain / "iter_0000005", 5, timeout_s=30)
        assert out.read_text() == f"5 {plain / 'iter_0000005'}\n"
    letters = tmp_path / "Prüfung-日本"
    out = tmp_path / "nested.txt"
    nested = f"bash -c 'echo {{path}} > {out}'"
    assert load_run_config(config, [f"checkpoint.post_save_command={nested}",
                                    f"checkpoint.dir={letters}"]).checkpoint_dir == letters
    assert run_command(nested, letters, 5, timeout_s=30) and out.read_text() == f"{letters}\n"
    with pytest.raises(ConfigError, match=r"holds ' ': .* another shell \(bash -c\), which would "
                                          r"split it .* choose a checkpoint.dir without spaces"):
        load_run_config(config, [f"checkpoint.post_save_command={nested}", f"checkpoint.dir={plain}"])


def test_a_stop_signal_gives_a_hanging_post_save_command_a_short_grace(tmp_path):
    """Preempted while an upload hangs: the trainer stops the command's whole process group after
    the grace and skips the queued ones, instead of waiting out post_save_timeout_s."""
    from megasmol.train.callbacks.post_save import PostSaveRunner

    pids = tmp_path / "pids"
    runner = PostSaveRunner(f"echo $$ >> {pids}; sleep 300 & wait", timeout_s=3600)
    runner.submit(tmp_path / "iter_0000002", 2)
    runner.submit(tmp_path / "iter_0000004", 4)
    deadline = time.time() + 30
    while not pids.exists() and time.time() < deadline:
        time.sleep(0.1)
    started = time.time()
    runner.close(grace_s=1.0)
    assert time.time() - started < 20 and not runner._thread.is_alive()
    (pid,) = [int(line) for line in pids.read_text().split()]  # the second one never started
    assert _live_group_members(pid) == []  # the shell and its sleep are gone


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (zombies awaiting their reaper do not)."""
    deadline, live = time.time() + 10, []
    while time.time() < deadline:
        live = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(int(stat.parent.name))
        if not live:
            break
        time.sleep(0.2)
    return live


@serial
def test_sigterm_with_a_hung_post_save_command_exits_within_the_grace(tmp_path):
    """A post-save command that ignores SIGTERM held the exit for 30 s after the save, plus 5 to
    kill it: past Slurm's default KillWait of 30 s, so the job was SIGKILLed. The save and the wait
    now end within checkpoint.signal_grace_s of the signal, and the command's group is stopped."""
    pids, grace = tmp_path / "pids", 4
    hung = f"echo $$ >> {pids}; trap '' TERM; while :; do sleep 1; done"
    config = write_training_run(tmp_path, steps=200, checkpoint={
        "interval": 3, "post_save_command": hung, "signal_grace_s": grace})
    proc = start_train(config)
    try:
        wait_for_step(proc, tmp_path / "run", 4, committed=True)
        deadline = time.time() + 60
        while not pids.exists() and time.time() < deadline:
            time.sleep(0.05)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # not the command's group: it runs on, ignoring TERM
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        kill_session(proc)
    assert proc.returncode == 0 and "stopped by SIGTERM" in out, err[-3000:]
    assert "checkpoint.signal_grace_s" in err
    assert took < grace + 6, took  # the grace, then the trainer's own exit
    (pid,) = [int(line) for line in pids.read_text().split()]
    assert _live_group_members(pid) == []


@serial
def test_a_post_save_command_that_hangs_is_stopped(tmp_path):
    started = time.time()
    assert not run_command("sleep 60", tmp_path, 1, timeout_s=1)
    assert time.time() - started < 15


def test_a_second_trainer_on_the_same_run_is_refused(tmp_path):
    config = write_training_run(tmp_path, steps=400, checkpoint={"interval": 0})
    first = start_train(config)
    try:
        wait_for_step(first, tmp_path / "run", 2)
        second = train(config, check=False)
        assert second.returncode == 1 and "is being trained by pid" in second.stderr, second.stderr
    finally:
        kill_session(first)


def test_a_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    """Refused in one line before training (in this process: no peer or timing involved)."""
    config = write_training_run(tmp_path, steps=4)
    (tmp_path / "afile").write_text("x")
    proc = cli_in_process("train", "--config", str(config), "--set", f"checkpoint.dir={tmp_path / 'afile'}")
    assert proc.returncode == 2 and "checkpoint.dir" in proc.stderr and "is a file" in proc.stderr


def test_a_run_takes_its_model_from_a_checkpoint(tmp_path):
    """The spec comes from the checkpoint (an initial one: its spec is what is read)."""
    config = write_training_run(tmp_path, steps=4)
    source = tmp_path / "init"
    assert cli_in_process("init", "--spec", str(tmp_path / "spec.yaml"), "--out", str(source)).returncode == 0
    spec = run_model_spec(load_run_config(config, [f"checkpoint.init_from={source}", "model=null",
                                                   "rope.theta=20000"]))
    assert spec.num_layers == 4 and spec.rope_theta == 20000.0
    assert run_model_spec(load_run_config(config, [f"model={source}"])).vocab_size == 512
    with pytest.raises(ConfigError, match="model is missing"):
        load_run_config(config, ["model=null"])
    proc = run_cli("train", "--config", str(config), "--set", "model=null", "--set",
                   f"checkpoint.init_from={source}")
    assert "trained to step 4" in proc.stdout


def test_a_missing_init_from_checkpoint_is_named_not_taken_for_a_preset(tmp_path):
    config = write_training_run(tmp_path, steps=4)
    missing = tmp_path / "demo" / "sft" / "run" / "checkpoints"
    with pytest.raises(
            ConfigError, match=r"^checkpoint.init_from: no such checkpoint: .*/sft/run/checkpoints$"
    ):
        run_model_spec(load_run_config(config, [f"checkpoint.init_from={missing}", "model=null"]))


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 3})
    proc = train(config, env_extra={"MEGASMOL_FAULT": "enospc_in_save:6"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "saving step 6 to" in proc.stderr and "No space left on device" in proc.stderr
    assert "no space left on device (ENOSPC) in " in proc.stderr
    assert _latest_step(tmp_path / "run") == 3
    resumed = train(config)
    assert "at step 3" in resumed.stdout and max(step_losses(tmp_path / "run")) == STEPS


def test_a_full_disk_under_async_saves_is_one_line_naming_enospc(tmp_path):
    """A background save that fails is collected steps later; torch's zip writer says only
    "unexpected pos". Still one line, naming ENOSPC and the directory, no traceback."""
    config = write_training_run(tmp_path, steps=STEPS, checkpoint={"interval": 3, "async_save": True})
    proc = train(config, env_extra={"MEGASMOL_FAULT": "full_disk_in_async_save:6"}, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "no space left on device (ENOSPC) in " in errors[0], errors
    assert str(tmp_path / "run" / "checkpoints") in errors[0] and "unexpected pos" in errors[0]
    assert _latest_step(tmp_path / "run") == 3


def test_resuming_under_a_changed_spec_names_the_tensor(reference, tmp_path):
    import shutil

    import yaml

    config = write_training_run(tmp_path, steps=STEPS)
    shutil.copytree(reference["root"] / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    spec = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**spec, "ffn_hidden_size": 96}))
    proc = train(config, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "has shape (4, 32, 64) in the checkpoint but (4, 32, 96) in this run's model" in proc.stderr
    assert "tensor decoder.layers." in proc.stderr
