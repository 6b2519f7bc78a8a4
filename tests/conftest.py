import contextlib
import io
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# One OpenMP thread per process (the pytest workers and every process they start) unless
# OMP_NUM_THREADS is set: `make test` runs two workers on two cores, and a two-thread team in a
# process whose cores the other worker keeps busy waits at each barrier for its descheduled
# thread. On the loaded 2-core VM a step of the tests' small training model took 2.5-3.7 s with
# two threads and 0.17-0.24 s with one (docs/tests.md). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    """A port that binds now, below Linux's ephemeral range (32768-60999): the ports the kernel
    hands out for other connections (gloo's, a parallel pytest worker's) never land on it between
    this check and torchrun's bind."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 600,
                 env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run`` with 2 gloo processes; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    for _ in range(3):  # another process may still take the port first: then pick another
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr:
            break
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def run_cli(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megasmol", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"megasmol {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``megasmol ARGS`` run by the CLI's ``main`` in this process: what it prints and its exit
    code, as ``run_cli`` gives them, without a fresh interpreter: a command that loads torch and
    Megatron-Core costs 5-6 s of CPU in a process of its own (init 5.8, export-hf 5.7, eval
    tasks 9.2 on the 2-core VM), most of it imports. For commands that stop before training or
    any distributed setup (a refused input, a dry run) or only read checkpoints (init, export,
    eval, generate): one that must show how a real process ends keeps ``run_cli``, and so does a
    test that uses a model it built before the command (the command's ``shutdown()`` ends that
    model's groups). An exception ``main`` lets through (a traceback in a real process) fails
    the test."""
    import torch.distributed

    from megasmol.cli import main

    had_group = torch.distributed.is_initialized()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    # A command that set up a process group would leave this worker's runtime changed.
    assert had_group or not torch.distributed.is_initialized(), f"megasmol {args[0]}: use run_cli"
    if had_group and not torch.distributed.is_initialized():
        # It shut down the runtime it found (commands end with `shutdown()`): the next tests get
        # one again, but a model built before the command holds the old groups.
        ensure_megatron_runtime()
    return subprocess.CompletedProcess(["megasmol", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def _subprocess_tmpdir(tmp_path_factory):
    """Child processes write their temporary files (torchrun's ``torchelastic_*`` log folders) under
    pytest's own temporary folder, which pytest prunes, instead of leaving them in /tmp."""
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess-tmp"))
    yield
    if previous is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous


def ensure_megatron_runtime() -> None:
    """Single-process gloo runtime with Megatron parallel_state (TP=PP=1) for in-process tests:
    set up once, and again when a test that ran before in this worker shut it down."""
    from megatron.core import parallel_state

    from megasmol.config.parallel import ParallelLayout
    from megasmol.runtime.distributed import init_parallel

    if not parallel_state.model_parallel_is_initialized():
        init_parallel(ParallelLayout())


@pytest.fixture
def megatron_runtime():
    ensure_megatron_runtime()
    yield


@pytest.fixture(scope="session")
def llama_tokenizer_dir():
    from megasmol.tokenizer import default_tokenizer_dir

    return default_tokenizer_dir()


# Files are handed to the xdist workers longest first (tests/file_order.py).
from tests.file_order import (  # noqa: E402,F401
    pytest_collection_modifyitems,
    pytest_runtest_logreport,
    pytest_sessionfinish,
)

# A real S3 server on the loopback interface, for the tests of checkpoints in a bucket.
from tests.s3_fixtures import s3, s3_server  # noqa: E402,F401
