"""``checkpoint.post_save_command``: the user's command for each new checkpoint (an upload, an
evaluation job), run off the training thread, one at a time, with a time limit.

The checkpoint's path and step reach the command as the environment variables
``MEGASMOL_CHECKPOINT`` and ``MEGASMOL_STEP``. The ``{path}`` and ``{step}`` placeholders are
rewritten into references to those variables, quoted for where they stand (bare, inside
``"..."`` or inside ``'...'``): the shell that runs the command always sees the path as one word.
A command can still hand the expanded path to a second shell that parses it again (``bash -c
'...'``, ``sh -c "..."``, ``eval``, ``sbatch --wrap``, ``ssh host '...'``), so the checkpoint
directory of a run with a post-save command may only hold characters that no shell treats
specially: letters of any script, digits and ``._/+=@%:,~-`` (a non-ASCII character is made of
bytes above 127, which no shell reads as syntax). Then no template, however nested, can turn the
path into code. A space cannot become code either, but a second shell would split the path at
it: spaces are allowed unless the command names such a shell. Both rules, and the template's
quoting, are checked when the config is loaded, before anything runs.
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
import time
import unicodedata
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

PLACEHOLDERS = {"{path}": "MEGASMOL_CHECKPOINT", "{step}": "MEGASMOL_STEP"}
SHELL_INERT = re.compile(r"[A-Za-z0-9._/+=@%:,~-]*")
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "busybox",
          "$SHELL", "${SHELL}"}
"""Programs that parse a ``-c`` argument as shell code."""
TAKES_C = {"flock", "script", "su", "runuser"}
"""Programs whose ``-c`` argument is a command line for a shell."""
REPARSERS = {"eval", "ssh", "watch", "pdsh", "clush", "xargs"}
"""Programs that join their arguments into a command line for a shell (or split input at spaces)."""


def _inert(char: str) -> bool:
    """No shell reads ``char`` as syntax: ASCII letters, digits and ``._/+=@%:,~-``, and the
    letters, marks and digits of other scripts (all their UTF-8 bytes are above 127)."""
    if char.isascii():
        return bool(SHELL_INERT.fullmatch(char))
    return unicodedata.category(char)[0] in "LMN"


def nested_shell(template: str) -> Optional[str]:
    """The words of ``template`` that hand a command line to a second shell (``bash -c``,
    ``eval``, ``ssh``, ``sbatch --wrap``...), or None when it names none of them."""
    lexer = shlex.shlex(template, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for word in [*lexer, ";"]:
        if word and set(word) <= set("();<>|&"):  # the end of a simple command
            command = []
            continue
        name = word.rsplit("/", 1)[-1]
        if name in REPARSERS or word.startswith("--wrap"):
            return word.split("=", 1)[0]
        if re.fullmatch(r"-[A-Za-z]*c[A-Za-z]*", word):
            starter = next((w for w in command if w.rsplit("/", 1)[-1] in SHELLS | TAKES_C), None)
            if starter is not None:
                return f"{starter} {word}"
        command.append(word)
    return None


def check_command(template: str, checkpoint_dir: Path) -> None:
    """Refuse, once and before training, a template the shell cannot parse and a checkpoint
    directory whose path a nested shell could read as code or split into words."""
    from megasmol.config.typed import ConfigError

    try:
        shlex.split(shell_line(template))
    except ValueError as exc:
        raise ConfigError(f"checkpoint.post_save_command: {exc} in {template!r}") from None
    path = str(checkpoint_dir)
    odd = sorted({c for c in path if not _inert(c) and c != " "})
    if odd:
        raise ConfigError(
            f"checkpoint.dir {path!r} holds {' '.join(repr(c) for c in odd)}: with a "
            "post_save_command, the checkpoint path may only hold letters, digits, spaces and "
            "._/+=@%:,~- (a command that passes it to another shell would run the rest as code); "
            "choose another checkpoint.dir (--set checkpoint.dir=...)")
    nested = nested_shell(template) if " " in path else None
    if nested is not None:
        raise ConfigError(
            f"checkpoint.dir {path!r} holds ' ': checkpoint.post_save_command hands the path to "
            f"another shell ({nested}), which would split it into words at each space; choose a "
            "checkpoint.dir without spaces, or have the command run a script that takes {path} as "
            "one argument")


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
                ok = run_command(self.template, *item, self.timeout_s, started=self._started)
                if ok and self.on_success:
                    self.on_success(item[0])
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
