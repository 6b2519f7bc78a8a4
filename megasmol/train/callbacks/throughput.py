"""A warning when tokens/s per device stays below a fraction of the expected figure
(``logging.expected_tokens_per_s_per_gpu``), naming the slowest GPU and why it throttles."""

from __future__ import annotations

from megasmol.runtime.run_dir import Kind
from megasmol.train.callbacks.base import Callback, LoopContext
from megasmol.train.throughput_watch import ThroughputWatch


class ThroughputCallback(Callback):
    priority = 10
    name = "throughput"

    def __init__(self, ctx: LoopContext, logging_config, sampler=None):
        """``sampler``: this rank's GPU sampler (``metrics.NvmlSampler``); None: no GPU figures."""
        self.ctx = ctx
        self.watch = ThroughputWatch(logging_config.expected_tokens_per_s_per_gpu,
                                     logging_config.throughput_fraction, logging_config.throughput_window)
        self.sampler = sampler

    def _sample(self) -> dict:
        return self.sampler.sample() if self.sampler is not None else {}

    def on_log(self, record: dict, steps: int) -> None:
        warning = self.watch.check(record["step"], record, steps, self._sample)  # collective
        if warning is not None:
            self.ctx.emit(Kind.THROUGHPUT_WARNING, warning, self.watch.line(warning))
