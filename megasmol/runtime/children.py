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

Megatron starts that manager with ``spawn`` (safe with CUDA): a fresh interpreter that imports
torch again to unpickle the results, about 3 s of CPU in every process that saves (a 3-step run of
the tests' small model took 7.7 s of user time with its one save and 4.4-4.7 s without; 2-core VM,
2026-12-07). Where the CPU layer is on (``cpu_compat``: no CUDA in the process) the manager is
forked instead, as the writer's own processes already are, with a fresh interpreter's signal
handling.
"""

from __future__ import annotations

import contextlib
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


def as_a_fresh_interpreter() -> None:
    """In a forked helper: the signal handling a spawned interpreter starts with (the trainer's
    SIGTERM/SIGUSR handlers and faulthandler's dumps are the trainer's alone; the signal mask is
    inherited either way)."""
    import faulthandler

    faulthandler.disable()
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            faulthandler.unregister(sig)
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)


def _start_helper(parent: int, forked: bool) -> None:
    if forked:
        as_a_fresh_interpreter()
    die_with_parent(parent)


def own_megatron_write_queue() -> None:
    """Start the manager of Megatron-Core's checkpoint write-results queue before Megatron does,
    dying with this rank: spawned as Megatron would, or forked where the CPU layer is on. Called
    before every save (it does nothing once the queue exists), on the thread that lives as long as
    the process (the parent-death signal follows the thread that started the child)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megasmol.runtime import cpu_compat

    if filesystem_async._results_queue is not None:
        return
    import multiprocessing
    from multiprocessing.managers import SyncManager

    forked = cpu_compat.is_active()
    manager = SyncManager(ctx=multiprocessing.get_context("fork" if forked else "spawn"))
    manager.start(_start_helper, (os.getpid(), forked))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps its manager
