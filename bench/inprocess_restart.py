"""Time from a lost rank to the next completed step: in-process restart vs a full torchrun restart.

    python bench/inprocess_restart.py [--workdir DIR] [--rounds 2]

The same job (the tests' 4-layer model, 2 gloo ranks, 12 steps, a checkpoint every 3) loses
rank 1 at step 8 (``MEGASMOL_FAULT=kill:8``: SIGKILL before its forward pass) in two ways:

* **in-process**: ``resilience.in_process_restart`` with ``spare_ranks: 1``, 3 processes started
  as srun ``--kill-on-bad-exit=0`` would (torchrun ends every worker when one exits); the spare
  takes rank 1's place and the job resumes from step 6 in the same processes;
* **full restart**: torchrun with 2 processes, no in-process restart; torchrun ends the job when
  rank 1 dies, and this script starts the same torchrun command again at once (what a requeue
  does, without the scheduler's wait), which resumes from the same checkpoint (step 6).

Both are timed the same way, from the console lines as they arrive: from step 7's line before
the fault (rank 1 dies right after it, at the start of step 8) to step 7's line after the
restart (the first step run again). The rounds alternate so the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEP7 = "step  7/12"
FAULT = {"MEGASMOL_FAULT": "kill:8", "MEGASMOL_FAULT_RANK": "1"}
TIMEOUTS = {"in_process_restart": True, "soft_timeout_s": 35, "hard_timeout_s": 45,
            "heartbeat_timeout_s": 20, "barrier_timeout_s": 90}


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


def _env(extra: dict) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO), **extra}


def _config(root: Path, resilience: dict) -> Path:
    from tests.train_fixtures import write_training_run

    shutil.rmtree(root, ignore_errors=True)
    return write_training_run(root, steps=12, checkpoint={"interval": 3, "keep_last": 0},
                              training={"collective_timeout_s": 25}, resilience=resilience)


class Lines:
    """Collects the lines of several processes' stdout with their arrival times."""

    def __init__(self):
        self.seen: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def follow(self, proc: subprocess.Popen) -> None:
        def read():
            for line in proc.stdout:
                with self._lock:
                    self.seen.append((time.monotonic(), line.rstrip("\n")))
        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def times_of(self, text: str) -> list[float]:
        return [t for t, line in self.seen if text in line]


def _launch_ranks(config: Path, nproc: int, lines: Lines) -> list[int]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "megasmol", "train", "--config", str(config)],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=_env({**FAULT, "RANK": str(rank), "WORLD_SIZE": str(nproc),
                                        "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                        "MASTER_PORT": str(port)}))
             for rank in range(nproc)]
    for proc in procs:
        lines.follow(proc)
    codes = [proc.wait(timeout=600) for proc in procs]
    lines.join()
    return codes


def _torchrun(config: Path, lines: Lines, fault: bool) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "megasmol",
                             "train", "--config", str(config)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=_env(FAULT if fault else {}))
    lines.follow(proc)
    code = proc.wait(timeout=600)
    lines.join()
    return code


def in_process(workdir: Path) -> float:
    lines = Lines()
    codes = _launch_ranks(_config(workdir / "inprocess", {**TIMEOUTS, "spare_ranks": 1}), 3, lines)
    step7 = lines.times_of(STEP7)
    reported = [line for _, line in lines.seen if line.startswith("in-process restart")]
    if codes != [0, -9, 0] or len(step7) != 2:
        raise SystemExit(f"in-process run: exit codes {codes}, step 7 seen {len(step7)} times")
    print(f"  in-process: {step7[1] - step7[0]:.1f} s ({reported[0]})", flush=True)
    return step7[1] - step7[0]


def full_restart(workdir: Path) -> float:
    config = _config(workdir / "restart", {"in_process_restart": False})
    lines = Lines()
    first = _torchrun(config, lines, fault=True)
    second = _torchrun(config, lines, fault=False)  # at once: what a requeue does, without the wait
    step7 = lines.times_of(STEP7)
    if first == 0 or second != 0 or len(step7) != 2:
        raise SystemExit(f"full restart: exit codes {first}, {second}; step 7 seen {len(step7)} times")
    print(f"  full restart: {step7[1] - step7[0]:.1f} s", flush=True)
    return step7[1] - step7[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="inprocess-bench-"))
    inproc, restart = [], []
    for round_ in range(args.rounds):
        print(f"round {round_ + 1} of {args.rounds}", flush=True)
        inproc.append(in_process(workdir))
        restart.append(full_restart(workdir))
    a, b = statistics.median(inproc), statistics.median(restart)
    print(f"fault to the next step done, median of {args.rounds}: in-process {a:.1f} s, full torchrun "
          f"restart {b:.1f} s; full / in-process = {b / a:.1f}x")


if __name__ == "__main__":
    main()
