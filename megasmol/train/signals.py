"""Preemption: SIGTERM / SIGUSR1 ask the run to save after the current step and exit.

Slurm sends SIGTERM before killing a preempted or timed-out job (``--signal=USR1@120`` sends
SIGUSR1 earlier); torchrun forwards SIGTERM to its workers. The handler only records the
request: the loop agrees on it across ranks in the step's all-reduce, then every rank saves the
same step together.

Those signals usually reach the whole process group (``kill -TERM -PGID``, torchrun stopping a
worker's group, Slurm signalling a step), so the helper processes the trainer starts (Megatron's
checkpoint writer keeps a ``multiprocessing`` manager, asynchronous saves fork writers) would get
them too and die before the save that the signal asks for. While a :class:`StopRequest` is
active, the trainer's thread blocks both signals: every process it starts inherits the blocked
mask and lives through them, and the trainer itself still sees them, through its handler (run
for a delivery to any other thread) or as pending signals it collects at each step.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Optional

WATCHED = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, enabled: bool):
        self.signal_name: Optional[str] = None
        self.since: Optional[float] = None  # time.monotonic() when this rank learnt of the request
        self._previous: dict[int, Any] = {}  # signal.signal's handlers
        self._blocked = False
        if enabled:
            for sig in WATCHED:
                self._previous[sig] = signal.signal(sig, self._handle)
            # multiprocessing's resource tracker unblocks SIGTERM after starting: start it now.
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
            self._blocked = True
            self._block()

    def _block(self) -> None:
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)

    def _handle(self, signum, frame):
        if self.since is None:
            self.since = time.monotonic()
        self.signal_name = signal.Signals(signum).name

    def _collect_pending(self) -> None:
        while self._blocked and set(WATCHED) & signal.sigpending():
            info = signal.sigtimedwait(WATCHED, 0)
            if info is None:
                return
            self._handle(info.si_signo, None)

    def agree(self, anyone: bool) -> bool:
        """Whether to stop after this step, given the all-reduced flag (``anyone`` asked): every
        rank decides alike; a rank that saw no signal itself names the other's."""
        if anyone and self.signal_name is None:
            self.signal_name = "signal on another rank"
            self.since = time.monotonic()
        return anyone

    @property
    def requested(self) -> bool:
        self._block()  # again: a library may have unblocked them since
        self._collect_pending()
        return self.signal_name is not None

    def restore(self) -> None:
        self._collect_pending()
        if self._blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
            self._blocked = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
