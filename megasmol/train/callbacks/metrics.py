"""Each logging interval's ``train`` record to the metric sinks (JSONL, trackers) and the console."""

from __future__ import annotations

from megasmol.runtime.run_dir import Kind
from megasmol.train.callbacks.base import Callback, LoopContext


class MetricsCallback(Callback):
    name = "metrics"

    def __init__(self, ctx: LoopContext):
        self.ctx = ctx

    def on_log(self, record: dict, steps: int) -> None:
        self.ctx.emit(Kind.TRAIN, record, self.ctx.metrics.console_line(record, self.ctx.total_steps))

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        self.ctx.metrics.close()
