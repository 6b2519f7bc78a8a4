"""The two confined processes of one code test: ``python -I -S child.py ROLE WORK MEMORY_MB TIMEOUT_S
OUTPUT_MB FD...`` (started by ``runner.py``; never imported by megasmol's own process).

* ``solution`` (untrusted: the prompt and the model's completion): runs ``WORK/solution.py``,
  then answers calls to its entry point. Each request (one line from fd ``REQUESTS``) holds the
  arguments as plain data; the answer (one line to fd ``ANSWERS``) holds the return value as
  plain data, or the name and message of what it raised. A value that is not plain data (an
  object whose ``__eq__`` is always true, say) cannot be sent: the call fails.
* ``tests`` (trusted: the task's tests): reads ``WORK/tests.json`` (``setup``, ``tests``,
  ``entry_point``), runs the setup (the prompt: helper functions the tests use), binds the entry
  point's name to a proxy that calls the solution process, runs the tests, and writes one JSON
  line to fd ``REPORT``: ``{"verdict": "passed" | "failed" | "unconfined", "reason": ...,
  "solution_ended": bool}``.

The solution process cannot see the tests, the report descriptor or anything of the tests
process (its memory, its files, its signals); what it sends is parsed as data and compared by
the tests process. Both confine themselves first (``confine.py``). Only the standard library is
used.
"""

from __future__ import annotations

import builtins
import json
import os
import runpy
import sys
import traceback

ANSWER_CAP = 16 << 20  # bytes of one answer line
_SCALARS = (type(None), bool, int, float, str)


class NotPlainData(TypeError):
    pass


def encode(value, depth: int = 0):
    """Plain data as JSON-ready values: scalars as themselves, containers tagged (exact types
    only: a subclass could compare or hash as it likes)."""
    if depth > 200:
        raise NotPlainData("nested too deeply")
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind in (list, tuple, set, frozenset):
        items = [encode(v, depth + 1) for v in value]
        return {kind.__name__: items}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise NotPlainData(f"a {kind.__name__} is not plain data (None, bool, int, float, complex, "
                       "str, bytes, list, tuple, set, frozenset, dict)")


def decode(data):
    """The inverse of ``encode``, checking every node; raises ValueError on anything else."""
    if type(data) in _SCALARS:
        return data
    if type(data) is not dict or len(data) != 1:
        raise ValueError("malformed plain data")
    (tag, payload), = data.items()
    if tag in ("list", "tuple", "set", "frozenset") and type(payload) is list:
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](
            decode(v) for v in payload)
    if tag == "dict" and type(payload) is list and all(type(p) is list and len(p) == 2
                                                      for p in payload):
        return {decode(k): decode(v) for k, v in payload}
    if tag == "bytes" and type(payload) is str:
        return bytes.fromhex(payload)
    if tag == "complex" and type(payload) is list and len(payload) == 2 and all(
            type(p) in (int, float) for p in payload):
        return complex(*payload)
    raise ValueError(f"malformed plain data ({tag})")


# --- the solution process --------------------------------------------------------------------

def serve(entry_point: str, namespace: dict, requests, answers) -> None:
    entry = namespace.get(entry_point)
    for line in requests:
        try:
            if not callable(entry):
                raise NameError(f"name {entry_point!r} is not defined as a function")
            args, kwargs = decode(json.loads(line))
            reply = ["ok", encode(entry(*args, **kwargs))]
        except BaseException as exc:  # noqa: BLE001 - every outcome is the caller's to judge
            reply = ["raise", type(exc).__name__, str(exc)[:1000]]
        answers.write(json.dumps(reply) + "\n")
        answers.flush()


def solution(work: str, requests_fd: int, answers_fd: int, entry_point: str) -> None:
    requests = os.fdopen(requests_fd, "r", encoding="utf-8")
    answers = os.fdopen(answers_fd, "w", encoding="utf-8")
    namespace = runpy.run_path(os.path.join(work, "solution.py"), run_name="solution")
    serve(entry_point, namespace, requests, answers)


# --- the tests process -----------------------------------------------------------------------

class SolutionEnded(BaseException):
    """The solution process ended or answered out of turn: no later call can be trusted. A
    BaseException, so that a test's ``except Exception`` cannot swallow it."""


class Candidate:
    """Calls the entry point in the solution process; arguments and answers as plain data."""

    def __init__(self, requests, answers, entry_point: str):
        self.requests, self.answers, self.__name__ = requests, answers, entry_point
        self.ended: str | None = None
        """Why the solution process can no longer be trusted (None while it can)."""

    def __call__(self, *args, **kwargs):
        if self.ended is not None:
            raise SolutionEnded(self.ended)
        try:
            self.requests.write(json.dumps(encode([list(args), kwargs])) + "\n")
            self.requests.flush()
        except BrokenPipeError:
            self._end("the solution ended before answering")
        line = self.answers.readline(ANSWER_CAP + 1)
        if not line:
            self._end("the solution ended before answering")
        if len(line) > ANSWER_CAP or not line.endswith("\n"):
            self._end("the solution's answer is too long")
        try:
            reply = json.loads(line)
            if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
                return decode(reply[1])
        except (ValueError, RecursionError):
            self._end("the solution's answer is not plain data")
        if type(reply) is list and len(reply) == 3 and reply[0] == "raise" and all(
                type(r) is str for r in reply[1:]):
            raise _rebuilt(reply[1], reply[2][:1000])
        self._end("the solution's answer is not plain data")

    def _end(self, why: str):
        self.ended = why
        raise SolutionEnded(why)


def _rebuilt(name: str, message: str) -> BaseException:
    """The built-in exception the solution raised, so a test that expects one sees it; anything
    else (its own classes, SystemExit) as a RuntimeError or the end of the solution."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except TypeError:
            pass
    elif isinstance(kind, type) and issubclass(kind, BaseException):
        return SolutionEnded(f"{name}: {message}")
    return RuntimeError(f"{name}: {message}")


def tests(work: str, requests_fd: int, answers_fd: int, report_fd: int, spec: dict) -> None:
    requests = os.fdopen(requests_fd, "w", encoding="utf-8")
    answers = os.fdopen(answers_fd, "r", encoding="utf-8")
    candidate = Candidate(requests, answers, spec["entry_point"])
    namespace: dict[str, object] = {"__name__": "tests"}
    try:
        exec(compile(spec["setup"], "prompt", "exec"), namespace)
        namespace[spec["entry_point"]] = candidate
        exec(compile(spec["tests"], "tests", "exec"), namespace)
        verdict, reason = ("passed", "") if candidate.ended is None else ("failed", candidate.ended)
    except SolutionEnded as exc:
        verdict, reason = "failed", str(exc)
    except BaseException as exc:  # noqa: BLE001 - the verdict
        verdict, reason = "failed", f"{type(exc).__name__}: {exc}".rstrip(": ")
    _report(report_fd, verdict, reason, candidate.ended is not None)


def _report(fd: int, verdict: str, reason: str, solution_ended: bool = False) -> None:
    line = json.dumps({"verdict": verdict, "reason": reason[:300], "solution_ended": solution_ended})
    os.write(fd, line.encode() + b"\n")


def _load_confine():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "megasmol_confine", os.path.join(os.path.dirname(os.path.abspath(__file__)), "confine.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list) -> None:
    """``solution WORK MEMORY_MB TIMEOUT_S OUTPUT_MB REQUESTS ANSWERS ENTRY_POINT`` or
    ``tests WORK MEMORY_MB TIMEOUT_S OUTPUT_MB REQUESTS ANSWERS REPORT``."""
    role, work, memory_mb, timeout_s, output_mb = argv[:5]
    # Started with -S (no site: its .pth files cost ~40 ms a process); the parent's site-packages
    # directories are added as plain path entries (what the program may import, and read).
    sys.path.extend(p for p in os.environ.pop("MEGASMOL_SANDBOX_SITE", "").split(os.pathsep) if p)
    fds = [int(fd) for fd in argv[5:7]] + ([int(argv[7])] if role == "tests" else [])
    os.chdir(work)
    spec = None
    if role == "tests":
        with open("tests.json", encoding="utf-8") as handle:
            spec = json.load(handle)
    confine = _load_confine()
    try:
        confine.confine(work, int(memory_mb), float(timeout_s), int(output_mb))
    except confine.Unconfined as exc:
        if role == "tests":
            _report(fds[2], "unconfined", str(exc))
        sys.exit(3)
    if role == "solution":
        try:
            solution(work, fds[0], fds[1], argv[7])
        except BaseException:  # noqa: BLE001 - the solution's own error, for the reader
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    else:
        assert spec is not None  # role "tests": read from tests.json above
        tests(work, fds[0], fds[1], fds[2], spec)


if __name__ == "__main__":
    main(sys.argv[1:])
