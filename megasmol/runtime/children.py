"""Helper processes that end with the rank that started them.

Megatron-Core's checkpoint writer keeps a ``multiprocessing`` manager process for its results
queue (``filesystem_async._get_write_results_queue``, made at the first save, sync or async), which
multiprocessing shuts down only at the rank's normal exit. A rank that ends otherwise (SIGKILL, the
hard timeout of an in-process restart, torchrun's SIGKILL after its grace time, ``os._exit``) left
it running: the manager does not watch its parent, and it inherits the SIGTERM that the trainer
blocks (``train/signals.py``: a stop signal to the process group must let the save finish), so
even a SIGTERM to the whole process group passes it by. It also holds the launcher's stdout, so
whoever reads that output (a test, a bench, a log pipe) waited for it forever. Here that queue's
manager is started by megasmol, with a parent-death signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a helper process (Linux): SIGKILL this process when its parent ends, also when it has
    ended already (``parent`` is its pid before the helper started)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # SIGTERM and SIGUSR1 stay blocked as the trainer left them: a stop signal to the whole
    # process group must not end this helper before the save that the signal asks for.
    if os.getppid() != parent:
        os._exit(0)


def own_megatron_write_queue() -> None:
    """Start the manager of Megatron-Core's checkpoint write-results queue before Megatron does,
    as Megatron would (a spawn context), but dying with this rank. Call it on the thread that lives
    as long as the process (the parent-death signal follows the thread that started the child)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    import multiprocessing
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(die_with_parent, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps its manager
