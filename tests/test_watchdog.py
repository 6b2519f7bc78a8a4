"""The hang watchdog: a step that hangs leaves every thread's stack on every rank and an exit code
the launch scripts requeue on; the requeued run resumes from the last checkpoint."""

import json

import pytest

from megasmol.config.sections import WatchdogConfig
from megasmol.config.typed import ConfigError
from megasmol.train.callbacks.hang import HANG_EXIT_CODE, HangWatchdog
from tests.conftest import free_port
from tests.train_fixtures import step_losses, train, write_training_run

pytestmark = pytest.mark.serial  # timing-sensitive: run alone (see Makefile)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_deadline_follows_the_median_step_time(tmp_path):
    clock = FakeClock()
    dog = HangWatchdog(WatchdogConfig(factor=10, min_s=5, first_step_s=100), tmp_path, 0, clock=clock)
    dog.on_step_start(1)
    clock.now = 99
    assert dog.overdue() is None  # the first step may take first_step_s
    clock.now = 101
    assert dog.overdue() == pytest.approx(101)
    dog.on_step_end(1)
    for step, seconds in enumerate((2.0, 1.0, 3.0, 2.0), start=2):
        dog.on_step_start(step)
        clock.now += seconds
        dog.on_step_end(step)
    assert dog.deadline_s() == pytest.approx(20.0)  # 10 x median(101, 2, 1, 3, 2)
    dog.on_step_start(6)
    clock.now += 19.5
    assert dog.overdue() is None
    clock.now += 1
    assert dog.overdue() == pytest.approx(20.5)
    dog.on_rollback(6)  # an abandoned step is not watched
    assert dog.overdue() is None
    fast = HangWatchdog(WatchdogConfig(factor=10, min_s=5), tmp_path, 0, clock=clock)
    for _ in range(3):
        fast.on_step_start(1)
        clock.now += 0.01
        fast.on_step_end(1)
    assert fast.deadline_s() == 5  # never below min_s
    assert HangWatchdog(WatchdogConfig(limit_s=7), tmp_path, 0, clock=clock).deadline_s() == 7
    with pytest.raises(ConfigError, match="watchdog.factor"):
        WatchdogConfig(factor=1.5).validate()


def test_a_hung_step_dumps_stacks_exits_75_and_the_requeued_run_resumes(tmp_path):
    config = write_training_run(tmp_path, steps=10, eval={"interval": 0},
                                watchdog={"min_s": 2.0, "factor": 5.0, "first_step_s": 60.0})
    out = train(config, env_extra={"MEGASMOL_FAULT": "hang:7"})
    assert out.returncode == HANG_EXIT_CODE, out.stderr[-2000:]
    assert "step 7 hung on rank 0" in out.stderr
    dump = (tmp_path / "run" / "hang-step7-rank0.txt").read_text()
    assert "hang_if_planned" in dump and "run_steps" in dump  # the main thread's stack
    assert max(step_losses(tmp_path / "run")) == 6
    marker = json.loads((tmp_path / "run" / "hang.json").read_text())
    assert marker["step"] == 7 and marker["rank"] == 0
    resumed = train(config)  # what the requeued job runs
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    assert max(step_losses(tmp_path / "run")) == 10


def test_every_rank_dumps_when_one_rank_hangs(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    config = write_training_run(tmp_path, steps=10, eval={"interval": 0},
                                watchdog={"min_s": 2.0, "factor": 5.0, "first_step_s": 60.0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "megasmol", "train",
           "--config", str(config), "--set", "parallel.tensor_parallel=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGASMOL_FAULT": "hang:4", "MEGASMOL_FAULT_RANK": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode != 0
    stuck = (tmp_path / "run" / "hang-step4-rank1.txt").read_text()
    waiting = (tmp_path / "run" / "hang-step4-rank0.txt").read_text()
    assert "hang_if_planned" in stuck
    assert "hang_if_planned" not in waiting  # rank 0 waits in a collective of the same step


def test_the_slurm_scripts_requeue_a_job_that_left_a_hang_marker(tmp_path):
    import os
    import subprocess

    from tests.conftest import REPO

    run_dir = tmp_path / "smollm3-3b-pretrain"
    run_dir.mkdir()
    (run_dir / "hang.json").write_text('{"step": 7, "rank": 3}')
    env = {**os.environ, "DRY_RUN": "1", "CKPT_DIR": str(tmp_path)}
    subprocess.run(["bash", str(REPO / "examples/slurm/smollm3.sbatch")], env=env, check=True,
                   capture_output=True, cwd=REPO)
    # Moved aside (so the requeued job starts clean); a real job also runs scontrol requeue.
    assert not (run_dir / "hang.json").exists() and (run_dir / "hang-dry-run.json").is_file()
    script = (REPO / "examples/slurm/smollm3.sbatch").read_text()
    assert '[[ "${hung}" -eq 1 ]]' in script and 'scontrol requeue "${SLURM_JOB_ID}"' in script


def test_nvrx_heartbeats_let_ft_launcher_end_a_hung_rank(tmp_path):
    """Under NVRx's ft_launcher with heartbeats on (megasmol's watchdog off), a hung step stops
    the heartbeats and the rank monitor kills the rank after --ft-rank-heartbeat-timeout; had no
    heartbeat been sent, only the 120 s initial timeout would apply."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from tests.train_fixtures import kill_session

    pytest.importorskip("nvidia_resiliency_ext.fault_tolerance")
    launcher = shutil.which("ft_launcher", path=os.path.dirname(sys.executable))
    assert launcher is not None
    config = write_training_run(tmp_path, steps=10, eval={"interval": 0},
                                watchdog={"enabled": False, "nvrx_heartbeats": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGASMOL_FAULT": "hang:7",
           "MEGASMOL_TEST_RUN": str(tmp_path)}
    log = tmp_path / "ft_launcher.log"
    started = time.monotonic()
    with open(log, "w") as handle:  # a file, not a pipe: NVRx's helper processes may outlive it
        proc = subprocess.Popen([launcher, "--nproc-per-node", "1", "--ft-initial-rank-heartbeat-timeout",
                                 "120", "--ft-rank-heartbeat-timeout", "4", "--max-restarts", "0",
                                 "-m", "megasmol", "train", "--config", str(config)],
                                stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=240)
        finally:
            kill_session(proc, marker=str(tmp_path))  # the launcher's rank monitors, what they left
    output = log.read_text()
    assert returncode != 0 and time.monotonic() - started < 90, output[-2000:]
    assert "SIGKILL" in output  # the rank monitor ended the hung rank
    assert max(step_losses(tmp_path / "run")) == 6  # ft_launcher --max-restarts N resumes it
