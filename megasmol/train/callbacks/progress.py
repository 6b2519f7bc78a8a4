"""The progress bar on the logging rank's terminal (the console prints through it while it shows).

Shown only where a person watches a terminal (``logging.progress`` and a TTY on stderr); log
lines carry the ETA otherwise. A rollback closes the bar; the restarted steps open a new one.
"""

from __future__ import annotations

import sys

from megasmol.train.callbacks.base import Callback, LoopContext


class ProgressCallback(Callback):
    name = "progress"

    def __init__(self, ctx: LoopContext, enabled: bool):
        self.ctx, self.enabled = ctx, enabled and ctx.console.active
        self.bar = None

    def on_train_start(self, step: int) -> None:
        self._close_bar()
        if not self.enabled or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        self.bar = tqdm(total=self.ctx.total_steps, initial=step, unit="step", dynamic_ncols=True)
        self.ctx.console.progress = self.bar

    def on_step_end(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_rollback(self, step: int) -> None:
        self._close_bar()

    def on_error(self, exc: BaseException) -> None:
        self._close_bar()

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = self.ctx.console.progress = None
