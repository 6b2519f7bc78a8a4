"""In-process restart (``resilience:``, NVRx's ``inprocess.Wrapper``): the config refuses what NVRx
would refuse, naming the fields; under torchrun, a rank that raises mid-run is healed in the same
processes and the run goes on exactly as a run resumed from the same checkpoint."""

import pytest

from megasmol.config.run import load_run_config
from megasmol.config.typed import ConfigError

BASE = ("model: smollm3-tiny\ndata: {recipe: demo}\n"
        "training: {train_steps: 10, global_batch_size: 1, collective_timeout_s: 20}\n"
        "schedule: {warmup_steps: 1}\nresilience: {in_process_restart: true}\n")


def _load(tmp_path, *sets):
    path = tmp_path / "run.yaml"
    path.write_text(BASE)
    return load_run_config(path, list(sets))


def test_the_defaults_load_and_in_process_restart_is_off_by_default(tmp_path):
    config = _load(tmp_path)
    assert config.resilience.in_process_restart
    path = tmp_path / "plain.yaml"
    path.write_text(BASE.replace("resilience: {in_process_restart: true}\n", ""))
    assert not load_run_config(path, ["training.collective_timeout_s=600"]).resilience.in_process_restart


@pytest.mark.parametrize("sets, named", [
    (["resilience.soft_timeout_s=100"], "soft_timeout_s < hard_timeout_s < barrier_timeout_s"),
    (["resilience.hard_timeout_s=200"], "soft_timeout_s < hard_timeout_s < barrier_timeout_s"),
    (["resilience.heartbeat_interval_s=40"], "resilience.heartbeat_interval_s"),
    (["resilience.heartbeat_timeout_s=130"], "resilience.heartbeat_timeout_s"),
    (["resilience.soft_timeout_s=0.5"], "resilience.soft_timeout_s must be > 1"),
    (["resilience.max_restarts=-1"], "resilience.max_restarts"),
    (["resilience.store_port=70000"], "resilience.store_port"),
    (["resilience.spare_ranks=-1"], "resilience.spare_ranks must be >= 0"),
    (["resilience.in_process_restart=false", "resilience.spare_ranks=1", "training.collective_timeout_s=60"],
     "resilience.spare_ranks needs resilience.in_process_restart"),
    (["training.collective_timeout_s=60"],
     "training.collective_timeout_s=60 must be below resilience.soft_timeout_s=60"),
    (["watchdog.min_s=90"], "watchdog.min_s=90 must be above resilience.hard_timeout_s=90"),
])
def test_nvrx_timeout_constraints_are_checked_at_load_time(tmp_path, sets, named):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, *sets)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_spare_ranks_are_taken_from_the_launched_processes(tmp_path):
    config = _load(tmp_path, "resilience.spare_ranks=1")
    assert config.resilience.training_world_size(3) == 2
    with pytest.raises(ConfigError, match=r"resilience.spare_ranks=1 leaves no rank to train: the "
                                          r"launcher started 1 processes"):
        config.resilience.training_world_size(1)
    assert _load(tmp_path).resilience.training_world_size(3) == 3


@pytest.mark.parametrize("sets, named", [
    (["resilience.local_checkpoint_every=-1"], "resilience.local_checkpoint_every must be >= 0"),
    (["resilience.in_process_restart=false", "resilience.local_checkpoint_every=2",
      "training.collective_timeout_s=600"],
     "resilience.local_checkpoint_every needs resilience.in_process_restart"),
    (["resilience.local_checkpoint_dir=/tmp"], "resilience.local_checkpoint_dir is set but "
                                               "resilience.local_checkpoint_every is 0"),
])
def test_local_copy_settings_are_checked_at_load_time(tmp_path, sets, named):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, *sets)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_the_local_copies_go_to_a_node_local_writable_place_outside_the_checkpoints(tmp_path):
    config = _load(tmp_path, "resilience.local_checkpoint_every=1")
    assert str(config.local_checkpoint_dir) in ("/dev/shm", __import__("tempfile").gettempdir())
    inside = config.checkpoint_dir / "local"
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "resilience.local_checkpoint_every=1", f"resilience.local_checkpoint_dir={inside}")
    assert str(err.value) == (f"resilience.local_checkpoint_dir={inside} is inside the checkpoint directory "
                              f"{config.checkpoint_dir}: choose a node-local directory outside it "
                              "(default /dev/shm)")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "resilience.local_checkpoint_every=1",
              f"resilience.local_checkpoint_dir={blocked / 'copies'}")
    assert str(err.value) == (f"resilience.local_checkpoint_dir={blocked / 'copies'}: {blocked} is not a "
                              "directory here")
    given = _load(tmp_path, "resilience.local_checkpoint_every=1",
                  f"resilience.local_checkpoint_dir={tmp_path / 'fast' / 'disk'}")
    assert given.local_checkpoint_dir == tmp_path / "fast" / "disk"  # made when the run starts


def test_the_cross_section_checks_apply_only_with_in_process_restart(tmp_path):
    config = _load(tmp_path, "resilience.in_process_restart=false", "training.collective_timeout_s=600",
                   "watchdog.min_s=5")
    assert config.training.collective_timeout_s == 600


# ----- under a launcher: 2 gloo ranks (3 with a spare), the 4-layer test model ------------------

STEPS = 12
COLLECTIVE_TIMEOUT_S = 15
"""On gloo the healthy rank learns of the fault when its collective with the failed rank times out
or its connection closes: a rank that raises costs its peers this wait. It was 25: when the first
checkpoint save spawned Megatron-Core's write-results manager (a fresh interpreter importing
torch), that save kept rank 0 busy 11 s on the loaded 2-core VM while rank 1 waited for it, and
15 s made a second, spurious fault in 2 runs of 6. The manager is forked since
(``runtime/children.py``): the first save takes 1-2 s there at a load average of 5-6."""
FAST = {"in_process_restart": True, "soft_timeout_s": 25, "hard_timeout_s": 35,
        "heartbeat_timeout_s": 20, "barrier_timeout_s": 90}
"""Short timeouts, the soft one above the collective timeout."""


def _config(root, resilience, steps=STEPS, collective_timeout_s=COLLECTIVE_TIMEOUT_S, interval=3):
    from tests.train_fixtures import write_training_run

    return write_training_run(root, steps=steps, checkpoint={"interval": interval, "keep_last": 0},
                              training={"collective_timeout_s": collective_timeout_s},
                              resilience=resilience)


def _env(env_extra):
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}


def _torchrun(config, env_extra=None):
    """torchrun with 2 processes; its output whatever the end."""
    import subprocess
    import sys

    from tests.conftest import REPO, free_port
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "megasmol",
                           "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=600, env=_env(env_extra), cwd=REPO)


def _launch(config, nproc, env_extra=None):
    """``nproc`` ranks started as srun ``--kill-on-bad-exit=0`` starts them (torchrun would stop the
    others when one exits): each with RANK, WORLD_SIZE and the rendezvous address; returns
    (return codes, stdout of all, stderr of all)."""
    import subprocess
    import sys

    from tests.conftest import REPO, free_port
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "megasmol", "train", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=_env({**(env_extra or {}), "RANK": str(rank),
                                        "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
             for rank in range(nproc)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], "".join(o for o, _ in outs), "".join(e for _, e in outs)


def _tagged(env_extra: dict) -> tuple[dict, str]:
    """``env_extra`` with a tag every process of the job inherits, for :func:`_left_behind`."""
    import uuid

    tag = uuid.uuid4().hex
    return {**env_extra, "MEGASMOL_TEST_JOB": tag}, tag


def _left_behind(tag: str, wait_s: float = 10.0) -> list[str]:
    """The processes of the job tagged ``tag`` still alive after ``wait_s``: every process it
    started carries the tag in its environment, NVRx's monitor processes (which leave the
    launcher's session) and multiprocessing's helpers included."""
    import os
    import time

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if f"MEGASMOL_TEST_JOB={tag}".encode() in fh.read():
                        with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                            command = cmd.read().replace(b"\0", b" ").decode(errors="replace")
                        left.append(f"{pid}: {command[:200]}")
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _losses_per_step(run_dir) -> dict[int, list[float]]:
    """Every loss the logging rank wrote for each step, in order (a step run again after a heal
    has two)."""
    import json

    losses: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses.setdefault(record["step"], []).append(record["loss"])
    return losses


@pytest.mark.serial
def test_a_raise_is_healed_from_the_newer_local_copy_then_a_spare_takes_a_killed_ranks_place(tmp_path):
    """Two faults in one launch of 3 processes (``resilience.spare_ranks: 1``), local copies
    (``resilience.local_checkpoint_every``) every 5 steps, checkpoints every 8. Rank 1 raises at
    step 8: healed in the same processes from the local copy of step 5, newer than any checkpoint.
    Rank 1 is killed at step 19: the spare takes its place (torchrun would stop every worker, so
    the ranks are started as srun ``--kill-on-bad-exit=0`` starts them) and the job resumes from
    the checkpoint of step 16, newer than the local copy of step 15. The steps trained again after
    each heal (6-7 and 17-18: the second one's loss follows the restored optimizer's update) give
    the losses of their first pass bit for bit, and the copies are gone once the job ends. (One
    launch, no run without a fault to compare with: the raise's heal waits out the collective
    timeout, and each launch starts two or three interpreters.)"""
    import re

    from megasmol.config.run import load_run_config
    from megasmol.train.local_copies import run_root

    steps, local = 20, tmp_path / "node-local"
    config = _config(tmp_path, {**FAST, "spare_ranks": 1, "local_checkpoint_every": 5,
                                "local_checkpoint_dir": str(local)}, steps=steps, interval=8)
    env, tag = _tagged({"MEGASMOL_FAULT": "raise:8,kill:19", "MEGASMOL_FAULT_RANK": "1"})
    codes, out, err = _launch(config, 3, env)
    assert codes == [0, -9, 0], (codes, out[-3000:], err[-6000:])
    lines = [line for line in out.splitlines() if "in-process restart" in line]
    assert len(lines) == 2, out
    assert re.fullmatch(r"in-process restart 1 of at most 3: rank 1 raised \(PlannedFault: planned fault "
                        r"\(MEGASMOL_FAULT=raise:8\) on rank 1\); resumed from step 5 \(local copy\); "
                        r"step 6 done [\d.]+ s after the fault", lines[0]), lines[0]
    assert re.fullmatch(r"in-process restart 2 of at most 3: rank 1 was (terminated|lost) \(its process "
                        r"ended[^;]*\); resumed from step 16 \(latest checkpoint\); step 17 done "
                        r"[\d.]+ s after the fault", lines[1]), lines[1]
    assert "resumed from the local copy of step 5" in out and out.count("resumed from the local copy") == 1
    assert f"trained to step {steps}" in out
    assert "audit: OK" in out and out.count("audit: OK") == 1  # not again
    losses = _losses_per_step(tmp_path / "run")
    assert sorted(losses) == list(range(1, steps + 1))
    again = {step: values for step, values in losses.items() if len(values) > 1}
    assert sorted(again) == [6, 7, 17, 18], losses
    assert all(first == rerun for first, rerun in again.values()), again  # bit for bit (JSON floats)
    assert local.is_dir() and not run_root(load_run_config(config)).exists()  # removed at the end
    assert ".dirty.pt" not in err  # NVRx's INFO lines for each file are kept quiet
    assert _left_behind(tag) == []


@pytest.mark.serial
def test_a_frozen_rank_is_ended_by_the_hard_timeout_naming_it_and_nothing_is_left(tmp_path):
    import time

    fast = {**FAST, "soft_timeout_s": 10, "hard_timeout_s": 13}
    config = _config(tmp_path, fast, steps=4, collective_timeout_s=6, interval=100)
    env, tag = _tagged({"MEGASMOL_FAULT": "hang:2", "MEGASMOL_FAULT_RANK": "1"})
    started = time.monotonic()
    ended = _torchrun(config, env)
    took = time.monotonic() - started
    assert ended.returncode != 0
    out = ended.stdout + ended.stderr
    lines = [line for line in out.splitlines() if "in-process restart" in line]
    assert len(lines) == 1, out[-6000:]
    # Rank 0 says it, whether it learns first that no spare is left or torchrun stops it first.
    assert lines[0].startswith("megasmol train: error: in-process restart: rank 1 was "), lines
    assert "resilience.hard_timeout_s" in lines[0] and "rank 0" not in lines[0], lines
    assert took < 150, took  # start-up and 2 steps, then the hard timeout (13 s) and the kill (5 s)
    assert _left_behind(tag) == []


@pytest.mark.serial
def test_a_killed_rank_without_a_spare_ends_the_job_naming_it_and_nothing_is_left(tmp_path):
    import re

    env, tag = _tagged({"MEGASMOL_FAULT": "kill:2", "MEGASMOL_FAULT_RANK": "1"})
    codes, out, err = _launch(_config(tmp_path, FAST, steps=4, interval=100), 2, env)
    assert codes[1] == -9 and codes[0] == 1, (codes, out[-3000:], err[-6000:])
    lines = [line for line in (out + err).splitlines() if "in-process restart" in line]
    assert len(lines) == 1, out + err[-6000:]
    assert re.fullmatch(r"megasmol train: error: in-process restart: rank 1 was (terminated|lost) \(its "
                        r"process ended[^;]*\); no spare rank takes its place \(resilience.spare_ranks=0\): "
                        r"the job ends; run it again to resume from the latest checkpoint", lines[0]), lines
    assert _left_behind(tag) == []


@pytest.mark.serial
def test_a_frozen_rank_is_ended_by_the_hard_timeout_and_a_spare_takes_its_place(tmp_path):
    """Rank 1 frozen outside Python at step 4 (a stuck kernel: NVRx's interruption cannot reach
    it) under a launcher that keeps the other processes, with a spare: the healthy rank's gloo
    collective times out, the hard timeout ends rank 1, and the spare trains in its place from
    the step-2 checkpoint; step 3, trained again, gives the loss of its first pass bit for bit."""
    import re

    fast = {**FAST, "soft_timeout_s": 12, "hard_timeout_s": 15, "spare_ranks": 1}
    config = _config(tmp_path, fast, steps=6, collective_timeout_s=10, interval=2)
    env, tag = _tagged({"MEGASMOL_FAULT": "hang:4", "MEGASMOL_FAULT_RANK": "1"})
    codes, out, err = _launch(config, 3, env)
    assert codes[0] == 0 and codes[2] == 0 and codes[1] != 0, (codes, out[-3000:], err[-6000:])
    lines = [line for line in out.splitlines() if "in-process restart" in line]
    assert len(lines) == 1, out
    assert re.fullmatch(r"in-process restart 1 of at most 3: rank 1 (was terminated after resilience\."
                        r"hard_timeout_s \(frozen\)|was lost \(its process ended[^;]*hard_timeout_s[^;]*\)); "
                        r"resumed from step 2; step 3 done [\d.]+ s after the fault",
                        lines[0]), lines[0]
    assert "trained to step 6" in out
    losses = _losses_per_step(tmp_path / "run")
    assert sorted(losses) == list(range(1, 7))
    again = {step: values for step, values in losses.items() if len(values) > 1}
    assert sorted(again) == [3], losses
    assert again[3][0] == again[3][1]  # the spare trains as rank 1 did: bit for bit (JSON floats)
    assert _left_behind(tag) == []
