"""The hang watchdog (``watchdog``): a thread on every rank that notices a training step taking
far longer than the steps before it, dumps every thread's Python stack to the run directory
(faulthandler), and ends the process with ``HANG_EXIT_CODE``, leaving ``<run_dir>/hang.json`` so
the launch scripts (``examples/slurm/*.sbatch``) requeue the job, which resumes from the last
checkpoint. The hooks time each step from ``on_step_start`` to ``on_step_end``; a rollback's
abandoned step is not a hang.

A step is overdue after ``max(watchdog.min_s, watchdog.factor x median of the recent step
times)`` (before any step finished: ``watchdog.first_step_s``), or after ``watchdog.limit_s``
when that is set. A step is its forward/backward passes, the all-reduce and the optimizer update;
validation, downstream evaluation and checkpoint saves are not watched (they have the collective
timeout of ``training.collective_timeout_s``). Every rank watches itself, so a rank stuck in a
kernel and the ranks waiting for it in a collective all leave a dump; a rank that fires waits
(at most one deadline) for the others' dumps before it exits.
"""

from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from megasmol.runtime.run_dir import RunDir
from megasmol.train.callbacks.base import Callback
from megasmol.utils.fs import shown

HANG_EXIT_CODE = 75  # EX_TEMPFAIL: try again
HISTORY = 50


class HangWatchdog(Callback):
    name = "hang_watchdog"

    def __init__(self, config, run_dir: Path, rank: int, clock=time.monotonic):
        self.config, self.run_dir, self.rank, self.clock = config, Path(run_dir), rank, clock
        self.times: deque[float] = deque(maxlen=HISTORY)
        self.started: Optional[float] = None
        self.step: Optional[int] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ----- the hooks ---------------------------------------------------------------------------
    def on_train_start(self, step: int) -> None:
        if self.config.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="megasmol-watchdog", daemon=True)
            self._thread.start()

    def on_step_start(self, step: int) -> None:
        with self._lock:
            self.step, self.started = step, self.clock()

    def on_step_end(self, step: int) -> None:
        with self._lock:
            if self.started is not None:
                self.times.append(self.clock() - self.started)
            self.started = None

    def on_rollback(self, step: int) -> None:
        """The current step was abandoned: it is not a hang; nothing is watched until the next."""
        with self._lock:
            self.started = None

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ----- the decision ----------------------------------------------------------------------
    def deadline_s(self) -> float:
        """How long the current step may take."""
        if self.config.limit_s is not None:
            return self.config.limit_s
        if not self.times:
            return max(self.config.min_s, self.config.first_step_s)
        return max(self.config.min_s, self.config.factor * statistics.median(self.times))

    def overdue(self) -> Optional[float]:
        """Seconds the current step has run, when that is past its deadline."""
        with self._lock:
            if self.started is None:
                return None
            elapsed = self.clock() - self.started
        return elapsed if elapsed > self.deadline_s() else None

    def _watch(self) -> None:
        # A tenth of the shortest deadline there can be (a fixed limit_s may sit below min_s), so
        # a hang is seen within 10% of its deadline; never busier than 20 checks a second.
        shortest = min(self.config.min_s, self.config.limit_s or self.config.min_s)
        poll = max(0.05, min(5.0, shortest / 10))
        while not self._stop.wait(poll):
            elapsed = self.overdue()
            if elapsed is not None:
                self._fire(elapsed)

    def _fire(self, elapsed: float) -> None:
        dump = self.run_dir / f"hang-step{self.step}-rank{self.rank}.txt"
        path: Optional[Path] = dump
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(dump, "w") as handle:
                handle.write(f"megasmol watchdog: step {self.step} on rank {self.rank} ran "
                             f"{elapsed:.0f}s (deadline {self.deadline_s():.0f}s); every thread's "
                             "stack:\n")
                handle.flush()
                faulthandler.dump_traceback(file=handle, all_threads=True)
        except OSError:
            path = None
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:  # what the launch scripts look for: this job hung, requeue it
            from megasmol.utils.fs import atomic_write_text

            atomic_write_text(RunDir(self.run_dir).hang_marker, json.dumps(
                {"step": self.step, "rank": self.rank, "elapsed_s": elapsed,
                 "deadline_s": self.deadline_s(), "stacks": str(path) if path else None}))
        except OSError:
            pass
        self._await_peer_dumps()
        print(f"megasmol train: error: step {self.step} hung on rank {self.rank} ({elapsed:.0f}s, "
              f"deadline {self.deadline_s():.0f}s); stacks in {shown(path) if path else 'stderr'}; "
              f"exiting with {HANG_EXIT_CODE} so the job is requeued and resumes from the last checkpoint",
              file=sys.stderr, flush=True)
        _end_children()  # checkpoint writers etc.: orphans would hold the GPU and the job's pipes
        os._exit(HANG_EXIT_CODE)  # a hung collective never returns: no clean shutdown is possible

    def _await_peer_dumps(self) -> None:
        """Wait (at most one deadline) until every rank of the job has left its dump of this step:
        the ranks waiting for the stuck one fire a little later, and once one rank exits the
        launcher tears the others down before they could write theirs."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return
        wait = min(self.deadline_s(), 120.0)
        recent = time.time() - wait - 1.0  # dumps an earlier attempt of this job left do not count
        give_up = time.monotonic() + wait
        while time.monotonic() < give_up:
            dumps = [p for p in self.run_dir.glob(f"hang-step{self.step}-rank*.txt")
                     if _mtime(p) >= recent]
            if len(dumps) >= world:
                return
            time.sleep(0.2)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _end_children() -> None:
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=10)
