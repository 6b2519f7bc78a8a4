"""Preemption: SIGTERM / SIGUSR1 ask the run to save after the current step and exit.

Slurm sends SIGTERM before killing a preempted or timed-out job (``--signal=USR1@120`` sends
SIGUSR1 earlier); torchrun forwards SIGTERM to its workers. The handler only records the
request: the loop agrees on it across ranks in the step's loss all-reduce, then every rank
saves the same step together.
"""

from __future__ import annotations

import signal

WATCHED = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, enabled: bool):
        self.signal_name = None
        self._previous = {}
        if enabled:
            for sig in WATCHED:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
