"""Downstream tasks scored by the training model in its own layout (``eval.in_loop``): every
``eval.tasks_interval`` steps, and with ``eval.tasks_at_checkpoint`` at each checkpoint (a
checkpoint saved at ``training.stop_after_step`` or at the end too; not one saved on a stop
signal, whose grace time is for saving) and at the last step."""

from __future__ import annotations

from typing import Optional

from megasmol.runtime.run_dir import Kind
from megasmol.train.callbacks.base import Callback, LoopContext


class DownstreamCallback(Callback):
    name = "downstream"

    def __init__(self, ctx: LoopContext, evaluation):
        """``evaluation``: an ``eval.in_loop.InLoopEvaluation``."""
        self.ctx, self.evaluation = ctx, evaluation
        self.scored: Optional[int] = None
        """The last step scored (a step is scored once, whichever hook asks)."""

    def on_step_done(self, step: int) -> None:
        evaluation = self.evaluation
        if ((evaluation.interval and step % evaluation.interval == 0)
                or (evaluation.at_checkpoint and step == self.ctx.total_steps)):
            self.score(step)

    def on_checkpoint(self, step: int, reason: str) -> None:
        if self.evaluation.at_checkpoint and reason != "signal":
            self.score(step)

    def score(self, step: int) -> None:
        """Collective: every rank scores; rank 0 writes ``downstream/iter_STEP/`` and the record."""
        if step == self.scored:
            return
        self.scored = step
        results = self.evaluation.run(self.ctx.setup)
        if self.ctx.setup.is_logging_rank:
            self.evaluation.write(step, results, self.ctx.run_dir)
        self.ctx.emit(Kind.DOWNSTREAM, {**self.evaluation.record(step, results),
                                     "consumed_tokens": self.ctx.state.consumed_tokens},
                      self.evaluation.line(step, results))
