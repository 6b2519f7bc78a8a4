"""The hang watchdog (``watchdog.HangWatchdog``): times each step from its start to its end and,
past the deadline, leaves every rank's stacks and ``hang.json`` and ends the job."""

from __future__ import annotations

from megasmol.train.callbacks.base import Callback
from megasmol.train.watchdog import HangWatchdog


class HangWatchdogCallback(Callback):
    priority = 20
    name = "hang_watchdog"

    def __init__(self, watchdog: HangWatchdog):
        self.watchdog = watchdog

    def on_train_start(self, step: int) -> None:
        self.watchdog.start()

    def on_step_start(self, step: int) -> None:
        self.watchdog.step_started(step)

    def on_step_end(self, step: int) -> None:
        self.watchdog.step_finished()

    def on_rollback(self, step: int) -> None:
        self.watchdog.idle()  # the abandoned step is not a hang

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        self.watchdog.close()
