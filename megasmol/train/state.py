"""What a run is, between two steps: the typed train state a checkpoint carries, and the result.

``TrainState`` is the loop's own part of a checkpoint's ``train_state`` (``megasmol.json``). Its
JSON keeps the keys every earlier checkpoint was written with (``step``, ``consumed_tokens``,
``skip_batches``, ``spike_window``, ``weights_finite``, ``lr``, ``branch``), so each resumes
bit for bit. ``TrainResult`` keeps what the commands print at the end: the first and the last
losses (bounded windows, not every step's) and how the run ended (validation losses are the
validation callback's, in ``metrics.jsonl``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

LOSS_WINDOW = 10
"""Losses kept at each end of a run for the summary line (``TrainResult.first_and_last_loss``)."""


@dataclass
class TrainState:
    step: int = 0
    """The last completed step (trained or skipped); 0 before the first."""
    consumed_tokens: int = 0
    """Training tokens of steps 1..``step``, skipped steps included (their data was drawn);
    for a branch, the source run's tokens carry on."""
    skip_batches: list[list[int]] = field(default_factory=list)
    """Inclusive ``[first, last]`` step ranges whose data is not trained on: the config's
    ``spikes.skip_batches`` and the ranges rollbacks added."""

    def skipped(self, step: int) -> bool:
        return any(first <= step <= last for first, last in self.skip_batches)

    def add_skip(self, first: int, last: int) -> None:
        if [first, last] not in self.skip_batches:
            self.skip_batches.append([first, last])

    def to_json(self, *, spike_window: list[float], lr: Optional[float], weights_finite: bool,
                branch: Optional[dict]) -> dict:
        """``megasmol.json``'s ``train_state``: this state, the step guard's window (so a resumed
        run judges spikes against the same losses) and what a reader of the checkpoint needs to
        know about the step (its LR, whether the weights are finite, the branch point)."""
        return {"step": self.step, "spike_window": list(spike_window),
                "skip_batches": [list(r) for r in self.skip_batches], "weights_finite": weights_finite,
                "lr": lr, "consumed_tokens": self.consumed_tokens, "branch": branch}

    @classmethod
    def from_json(cls, data: dict, *, skip_batches: list[list[int]],
                  tokens_through: Callable[[int], int]) -> TrainState:
        """The state saved in a checkpoint. ``skip_batches``: the config's ranges (kept, with
        the saved ones added); ``tokens_through(step)``: the tokens of steps 1..step, for
        checkpoints written before ``consumed_tokens`` was recorded."""
        step = int(data["step"])
        state = cls(step=step, consumed_tokens=data.get("consumed_tokens") or tokens_through(step),
                    skip_batches=[list(r) for r in skip_batches])
        for first, last in data.get("skip_batches", []):
            state.add_skip(first, last)
        return state


@dataclass
class TrainResult:
    last_step: int = 0
    first_losses: dict[int, float] = field(default_factory=dict)
    """The losses of the first ``LOSS_WINDOW`` trained steps."""
    last_losses: dict[int, float] = field(default_factory=dict)
    """The losses of the last ``LOSS_WINDOW`` trained steps (a rollback drops the steps it redoes)."""
    checkpoint: Optional[Path] = None
    stopped_by: Optional[str] = None
    resumed_from: Optional[int] = None
    rollbacks: int = 0

    def record_loss(self, step: int, loss: float) -> None:
        for later in [s for s in self.last_losses if s >= step]:
            del self.last_losses[later]  # redone after a rollback
        self.last_losses[step] = loss
        while len(self.last_losses) > LOSS_WINDOW:
            del self.last_losses[min(self.last_losses)]
        if step in self.first_losses or len(self.first_losses) < LOSS_WINDOW:
            self.first_losses[step] = loss

    def to_json(self) -> dict:
        """``result.json`` in the run directory: how the run ended."""
        return {"last_step": self.last_step, "stopped_by": self.stopped_by,
                "resumed_from": self.resumed_from, "rollbacks": self.rollbacks,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}

    @property
    def trained(self) -> bool:
        """Whether this process trained at least one step (a rerun of a finished run did not)."""
        return bool(self.last_losses)

    def first_and_last_loss(self, window: int = LOSS_WINDOW) -> tuple[float, float]:
        trained = len(set(self.first_losses) | set(self.last_losses))
        window = max(1, min(window, LOSS_WINDOW, trained // 2))  # a short run: halves, not overlap
        head = [self.first_losses[s] for s in sorted(self.first_losses)[:window]]
        tail = [self.last_losses[s] for s in sorted(self.last_losses)[-window:]]
        return sum(head) / len(head), sum(tail) / len(tail)
