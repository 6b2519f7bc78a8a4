"""The validation loss every ``eval.interval`` steps, on ``eval.steps`` held-out batches."""

from __future__ import annotations

import math

import torch

from megasmol.runtime.run_dir import Kind
from megasmol.train.callbacks.base import Callback, LoopContext


class ValidationCallback(Callback):
    name = "validation"

    def __init__(self, ctx: LoopContext, interval: int, steps: int):
        self.ctx, self.interval, self.steps = ctx, interval, steps
        self.losses: dict[int, float] = {}
        """Each validated step's loss."""

    def due(self, step: int) -> bool:
        return bool(self.interval and self.steps and step % self.interval == 0)

    def on_step_done(self, step: int) -> None:
        if self.due(step):
            self.validate(step)

    def validate(self, step: int) -> None:
        """Collective: the held-out batches of ``step``, forward only, one all-reduce."""
        from megasmol.train.step import forward_backward, global_loss, step_inputs

        setup = self.ctx.setup
        micro = setup.batches.validation_micro_batches(step, self.steps)
        if not micro:
            return
        inputs = step_inputs(setup, micro)
        setup.ddp_model.eval()
        with torch.no_grad():
            local = forward_backward(setup.ddp_model, inputs, forward_only=True, objective=setup.objective)
        setup.ddp_model.train()
        totals = global_loss(local, objective=setup.objective)
        loss, tokens, unit = totals.loss, totals.tokens, setup.objective.unit
        self.losses[step] = loss
        record = {"step": step, "loss": loss, unit: tokens,
                  "consumed_tokens": self.ctx.state.consumed_tokens, **totals.metrics}
        if unit == "tokens":
            record["perplexity"] = math.exp(min(loss, 50))
        detail = (f"ppl {math.exp(min(loss, 50)):.1f}, {tokens:,} tokens" if unit == "tokens" else
                  f"reward acc {totals.metrics.get('rewards/accuracies', float('nan')):.3f}, "
                  f"margin {totals.metrics.get('rewards/margins', float('nan')):.3f}, {tokens:,} {unit}")
        self.ctx.emit(Kind.VALIDATION, record, f"validation at step {step}: loss {loss:.4f} ({detail})")
