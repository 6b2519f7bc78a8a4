"""``checkpoint.post_save_command``: the user's command for each new checkpoint (an upload, an
evaluation job), run off the training thread, one at a time, with a time limit.

The checkpoint's path and step reach the command as the environment variables
``MEGASMOL_CHECKPOINT`` and ``MEGASMOL_STEP``. The ``{path}`` and ``{step}`` placeholders are
rewritten into references to those variables, quoted for where they stand (bare, inside
``"..."`` or inside ``'...'``). A command can still hand the expanded path to a second shell
that parses it again (``bash -c '...'``, ``sh -c "..."``, ``eval``, ``sbatch --wrap``, ``ssh
host '...'``), so the checkpoint directory of a run with a post-save command may only hold
characters that no shell treats specially (letters, digits and ``._/+=@%:,~-``): then no
template, however nested, can turn the path into code. Both rules are checked when the config is
loaded, before anything runs.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

PLACEHOLDERS = {"{path}": "MEGASMOL_CHECKPOINT", "{step}": "MEGASMOL_STEP"}
SHELL_INERT = re.compile(r"[A-Za-z0-9._/+=@%:,~-]*")


def check_command(template: str, checkpoint_dir: Path) -> None:
    """Refuse, once and before training, a template the shell cannot parse and a checkpoint
    directory whose path a nested shell could read as code."""
    from megasmol.config.typed import ConfigError

    try:
        shlex.split(shell_line(template))
    except ValueError as exc:
        raise ConfigError(f"checkpoint.post_save_command: {exc} in {template!r}") from None
    path = str(checkpoint_dir)
    if not SHELL_INERT.fullmatch(path):
        odd = sorted({c for c in path if not SHELL_INERT.fullmatch(c)})
        raise ConfigError(
            f"checkpoint.dir {path!r} holds {' '.join(repr(c) for c in odd)}: with a "
            "post_save_command, the checkpoint path may only hold letters, digits and ._/+=@%:,~- "
            "(a command that passes it to another shell would run the rest as code)")


def shell_line(template: str) -> str:
    """``template`` with each placeholder replaced by a quoted variable reference."""
    out, i, quote = [], 0, None  # quote: None, "'" or '"'
    while i < len(template):
        hit = next((p for p in PLACEHOLDERS if template.startswith(p, i)), None)
        if hit is not None:
            var = "${" + PLACEHOLDERS[hit] + "}"
            out.append({None: f'"{var}"', '"': var, "'": f"'\"{var}\"'"}[quote])
            i += len(hit)
            continue
        char = template[i]
        if char == "\\" and quote != "'" and i + 1 < len(template):
            out.append(template[i:i + 2])
            i += 2
            continue
        if char in "'\"" and quote in (None, char):
            quote = None if quote == char else char
        out.append(char)
        i += 1
    return "".join(out)


def run_command(template: str, path: Path, step: int, timeout_s: float,
                started: Optional[Callable[[subprocess.Popen], None]] = None) -> bool:
    """Run once and wait (at most ``timeout_s``); returns whether it exited 0. ``started`` is
    told the process, so its owner can stop it early."""
    env = {**os.environ, "MEGASMOL_CHECKPOINT": str(path), "MEGASMOL_STEP": str(step)}
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


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


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
                ok = run_command(self.template, *item, self.timeout_s, started=self._started)
                if ok and self.on_success:
                    self.on_success(item[0])
            except Exception:  # never take the training process down
                log.exception("post-save command for %s", item[0])
            finally:
                self._queue.task_done()

    def _started(self, proc: subprocess.Popen) -> None:
        self._running = proc

    def close(self, grace_s: Optional[float] = None) -> None:
        """Wait for the queued commands (each bounded by the timeout), then stop the thread.
        With ``grace_s`` (a stop signal: the job is being preempted), wait at most that long,
        then stop the running command's process group and skip the rest."""
        self._queue.put(None)
        self._thread.join(timeout=grace_s)
        if self._thread.is_alive():
            self._abandon.set()
            if self._running is not None and self._running.poll() is None:
                log.error("post-save command still running %.0f s after the stop signal; stopping it",
                          grace_s)
                _kill_group(self._running)
            self._thread.join(timeout=15)
