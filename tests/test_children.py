"""Megatron-Core's checkpoint writer keeps a manager process; megasmol starts it so that it ends with
the rank, however the rank ends (``runtime/children.py``)."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

RANK = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})  # as the trainer does
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megasmol.runtime.children import own_megatron_write_queue
own_megatron_write_queue()
queue = filesystem_async._results_queue
queue.put("ok")
assert queue.get() == "ok"
print(queue._manager._process.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no multiprocessing finalizers
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_the_checkpoint_writers_manager_ends_with_a_killed_rank():
    rank = subprocess.run([sys.executable, "-c", RANK], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert rank.returncode == -signal.SIGKILL, rank.stderr[-3000:]
    manager = int(rank.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(manager) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(manager):  # what megasmol's own manager must not do: clean up, then fail
        os.kill(manager, signal.SIGKILL)
        raise AssertionError("Megatron's write-results manager outlived its killed rank")
