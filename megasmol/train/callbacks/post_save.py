"""``checkpoint.post_save_command`` on each committed checkpoint (an upload, an evaluation job):
rank 0 runs it off the training thread, one command at a time, each with a time limit
(``checkpoint.post_save_timeout_s``), and waits for the queue at the end, bounded by the stop
signal's grace when the job is preempted. How the command sees the checkpoint (``{path}``,
``{step}``) and the rules on its path: ``config/post_save.py``.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from megasmol.config.post_save import command_env, shell_line
from megasmol.train.callbacks.base import Callback

log = logging.getLogger(__name__)


def run_command(template: str, path: Path, step: int, timeout_s: float,
                started: Optional[Callable[[subprocess.Popen], None]] = None) -> bool:
    """Run once and wait (at most ``timeout_s``); returns whether it exited 0. ``started`` is
    told the process, so its owner can stop it early."""
    env = {**os.environ, **command_env(path, step)}
    proc = subprocess.Popen(["/bin/sh", "-c", shell_line(template)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: a timeout ends all of it
    if started is not None:
        started(proc)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        log.error("post-save command for step %d still running after %.0f s "
                  "(checkpoint.post_save_timeout_s); stopped it", step, timeout_s)
        return False
    if proc.returncode != 0:
        if proc.returncode < 0:  # stopped by the trainer on its way out (see PostSaveRunner.close)
            log.error("post-save command for step %d stopped (%s)", step,
                      signal.Signals(-proc.returncode).name)
            return False
        log.error("post-save command for step %d failed (exit %d): %s", step, proc.returncode,
                  (output or "")[-2000:])
        return False
    return True


def _kill_group(proc: subprocess.Popen, wait_s: float = 5.0) -> None:
    """SIGTERM to the command's process group; SIGKILL when it is still there ``wait_s`` later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


STOP_S = 2.0
"""Of the time ``PostSaveRunner.close`` is given, what stopping a running command may take
(SIGTERM to its process group, 1 s, SIGKILL, 1 s)."""


class PostSaveRunner:
    """A worker thread that runs the command for each checkpoint in order; ``on_success`` (e.g.
    pruning uploaded checkpoints) runs on that thread after a command succeeds."""

    def __init__(self, template: str, timeout_s: float,
                 on_success: Optional[Callable[[Path], None]] = None):
        self.template, self.timeout_s, self.on_success = template, timeout_s, on_success
        self._queue: queue.Queue = queue.Queue()
        self._running: Optional[subprocess.Popen] = None
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._work, name="megasmol-post-save", daemon=True)
        self._thread.start()

    def submit(self, path: Path, step: int) -> None:
        self._queue.put((path, step))

    def _work(self) -> None:
        # The trainer's thread blocks the preemption signals (see train/signals.py); the user's
        # command starts with them unblocked, as from a shell.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._abandon.is_set():
                    log.error("post-save command for step %d not run: the trainer is stopping", item[1])
                    continue
                path, step = item
                ok = run_command(self.template, path, step, self.timeout_s, started=self._started)
                if ok and self.on_success:
                    self.on_success(path)
            except Exception:  # never take the training process down
                log.exception("post-save command for %s", item[0])
            finally:
                self._queue.task_done()

    def _started(self, proc: subprocess.Popen) -> None:
        self._running = proc
        if self._abandon.is_set():  # started as close() gave up: it would outlive the trainer
            _kill_group(proc, wait_s=STOP_S / 2)

    def close(self, grace_s: Optional[float] = None) -> None:
        """Wait for the queued commands (each bounded by the timeout), then stop the thread.
        With ``grace_s`` (a stop signal: the job is being preempted), return within that long: wait
        until ``STOP_S`` before its end, then stop the running command's process group and skip
        the rest."""
        self._queue.put(None)
        if grace_s is None:
            self._thread.join()
            return
        end = time.monotonic() + max(grace_s, 0.0)
        self._thread.join(timeout=max(end - STOP_S - time.monotonic(), 0.0))
        if self._thread.is_alive():
            self._abandon.set()
            running = self._running
            if running is not None and running.poll() is None:
                log.error("post-save command still running at the end of the stop signal's grace "
                          "(checkpoint.signal_grace_s); stopping it")
                _kill_group(running, wait_s=STOP_S / 2)
            self._thread.join(timeout=max(end - time.monotonic(), 0.1))


class PostSaveCallback(Callback):
    name = "post_save"

    def __init__(self, runner, grace_s: float,
                 signalled_at: Optional[Callable[[], Optional[float]]] = None):
        """``runner``: rank 0's ``PostSaveRunner``; None on the other ranks.
        ``grace_s``: ``checkpoint.signal_grace_s``, counted from ``signalled_at()`` (the
        ``time.monotonic()`` of the stop signal; now when it gives None)."""
        self.runner, self.grace_s, self.signalled_at = runner, grace_s, signalled_at

    def on_checkpoint_committed(self, path: Path, step: int) -> None:
        if self.runner is not None:
            self.runner.submit(path, step)

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        if self.runner is None:
            return
        if not stopped_by_signal:
            self.runner.close()
            return
        # Preempted: the save after the signal and the post-save command share the grace the
        # scheduler gives from its signal (Slurm's KillWait) before it kills the job.
        since = self.signalled_at() if self.signalled_at is not None else None
        since = time.monotonic() if since is None else since
        self.runner.close(since + self.grace_s - time.monotonic())
