"""The step guard: from a step's global loss and gradient flag, whether its update is applied.

A pure decision with its own state (the spike window and the run of non-finite steps); the step
(``step.train_step``) asks it once per trained step, on every rank with the same all-reduced
inputs, so every rank decides the same thing. The loop acts on ``rollback`` and ``diverged``.

* a spike (``SpikeDetector``; a non-finite loss is one) under ``spikes.policy: rollback`` ->
  ``rollback``;
* a non-finite loss or gradient -> ``skip`` (no update), or ``diverged`` once
  ``spikes.max_nonfinite_steps`` of them come in a row;
* a spike under ``spikes.policy: skip`` -> ``skip``; under ``log`` -> ``apply``;
* otherwise ``apply``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megasmol.config.sections import SpikeConfig
from megasmol.errors import RunFailure
from megasmol.runtime.run_dir import Kind
from megasmol.train.spikes import SpikeDetector, SpikeVerdict


class TrainingDiverged(RunFailure, RuntimeError):
    """Training cannot go on: too many consecutive steps had a non-finite loss or gradient, or a
    loss spike that rollbacks did not (or could not) get past."""


@dataclass(frozen=True)
class GuardDecision:
    action: str
    """``apply``, ``skip``, ``rollback`` or ``diverged``."""
    spike: Optional[SpikeVerdict] = None
    """The spike seen at this step (any policy), for the log."""
    nonfinite: Optional[str] = None
    """``loss`` or ``gradient`` when this step's was not finite."""
    in_a_row: int = 0
    """Consecutive non-finite steps, this one included."""


class StepGuard:
    def __init__(self, config: SpikeConfig, spike_window: Optional[list[float]] = None):
        self.config = config
        self.spikes = SpikeDetector(config, spike_window)
        self.nonfinite_in_a_row = 0

    def decide(self, step: int, loss: float, nonfinite_grads: bool) -> GuardDecision:
        policy = self.config.policy
        spike = self.spikes.check(step, loss)
        if spike is not None and policy == "rollback":
            return GuardDecision("rollback", spike)
        if nonfinite_grads or not math.isfinite(loss):
            self.nonfinite_in_a_row += 1
            what = "loss" if not math.isfinite(loss) else "gradient"
            action = "diverged" if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps else "skip"
            return GuardDecision(action, spike, what, self.nonfinite_in_a_row)
        self.nonfinite_in_a_row = 0
        if spike is not None and policy == "skip":
            return GuardDecision("skip", spike)
        return GuardDecision("apply", spike)

    def reports(self, step: int, loss: float, decision: GuardDecision) -> list[tuple[str, dict, str]]:
        """What the run's log says about ``decision``: ``(record kind, record, console line)``."""
        policy, limit = self.config.policy, self.config.max_nonfinite_steps
        out: list[tuple[str, dict[str, object], str]] = []
        if decision.spike is not None:
            out.append((Kind.SPIKE, {"step": step, "loss": loss, "policy": policy,
                                     "window_mean": decision.spike.mean},
                        f"loss spike: {decision.spike.describe()}; policy {policy}"))
        if decision.nonfinite is not None:
            out.append((Kind.SKIPPED_UPDATE, {"step": step, "loss": loss, "nonfinite": decision.nonfinite,
                                              "in_a_row": decision.in_a_row},
                        f"step {step}: non-finite {decision.nonfinite}; update skipped "
                        f"({decision.in_a_row} in a row, limit {limit})"))
        return out

    def diverged(self, step: int, decision: GuardDecision) -> TrainingDiverged:
        return TrainingDiverged(
            f"{decision.in_a_row} consecutive steps (up to {step}) had a non-finite "
            f"{decision.nonfinite} (spikes.max_nonfinite_steps={self.config.max_nonfinite_steps}); no "
            "update was applied, and the checkpoints hold the last finite weights: lower the LR, "
            "check the data of these steps, or skip them with spikes.skip_batches")

    def state_dict(self) -> dict:
        return {"spike_window": self.spikes.state(), "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.spikes = SpikeDetector(self.config, state.get("spike_window"))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
