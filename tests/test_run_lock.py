"""The run lock (``runtime/run_lock.py``): one trainer per run directory, and a lock released by
its holder is free again at once, in the same process, even while a process forked from the
holder (Megatron-Core's checkpoint writers, their results manager) still holds the descriptor."""

import os
import signal
import time

import pytest

from megasmol.runtime.run_lock import RunLock, RunLocked


def test_a_released_lock_is_taken_again_while_a_forked_child_lives(tmp_path):
    first = RunLock(tmp_path / "run", tmp_path / "run" / "checkpoints").__enter__()
    child = os.fork()
    if child == 0:  # a helper forked while the lock is held: it keeps a copy of the descriptor
        time.sleep(60)
        os._exit(0)
    try:
        with pytest.raises(RunLocked, match="one trainer per run directory"):
            RunLock(tmp_path / "run", tmp_path / "run" / "checkpoints").__enter__()
        first.release()  # what an in-process restart does before its next attempt
        again = RunLock(tmp_path / "run", tmp_path / "run" / "checkpoints").__enter__()
        again.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
