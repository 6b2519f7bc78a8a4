"""The learning-rate schedule's config (the schedules themselves: ``train/schedules.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megasmol.config.typed import ConfigError

DEFAULT_DECAY_FRACTION = 0.1


@dataclass
class ScheduleConfig:
    """Learning-rate schedule."""

    kind: Literal["wsd", "cosine", "multistep", "constant", "decay"] = "wsd"
    """Schedule family (see the module docstring)."""
    lr: float = 2e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (wsd, cosine)."""
    warmup_steps: int = 2000
    """Linear warmup from lr / warmup_steps (step 1) to lr (step warmup_steps)."""
    decay_steps: Optional[int] = None
    """wsd: length of the decay phase in steps (exclusive with decay_fraction)."""
    decay_fraction: Optional[float] = None
    """wsd: length of the decay phase as a fraction of the run's steps (0.1 when neither this
    nor decay_steps is given)."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """wsd and decay: shape of the decay phase."""
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])
    """multistep: fractions of the run after which the LR drops."""
    decay_factors: list[float] = field(default_factory=lambda: [0.316, 0.1])
    """multistep: LR multiplier in force after each milestone (relative to lr)."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"schedule.lr must be > 0, got {self.lr}")
        # decay: lr comes from the branch source, checked against min_lr once it is known
        if self.min_lr < 0 or (self.kind != "decay" and self.min_lr > self.lr):
            raise ConfigError(f"schedule.min_lr must be in [0, lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps must be >= 0")
        if self.kind == "wsd":
            if self.decay_steps is not None and self.decay_fraction is not None:
                raise ConfigError("schedule: give decay_steps or decay_fraction, not both")
            if self.decay_steps is None and self.decay_fraction is None:
                self.decay_fraction = DEFAULT_DECAY_FRACTION
            if self.decay_steps is not None and self.decay_steps < 1:
                raise ConfigError("schedule.decay_steps must be >= 1")
            if self.decay_fraction is not None and not 0 < self.decay_fraction <= 1:
                raise ConfigError("schedule.decay_fraction must be in (0, 1]")
        if self.kind == "multistep":
            if len(self.milestones) != len(self.decay_factors) or not self.milestones:
                raise ConfigError("schedule: milestones and decay_factors must have the same length")
            if sorted(self.milestones) != self.milestones or not all(0 < m < 1 for m in self.milestones):
                raise ConfigError("schedule.milestones must be increasing fractions in (0, 1)")

    def check_against(self, total_steps: int) -> None:
        """Errors that need the run length: warmup or decay longer than the run."""
        decay = self.decay_length(total_steps) if self.kind == "wsd" else 0
        if self.warmup_steps + decay > total_steps:
            raise ConfigError(f"schedule: warmup_steps ({self.warmup_steps}) + decay "
                              f"({decay}) exceed training.train_steps ({total_steps})")

    def decay_length(self, total_steps: int) -> int:
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, round((self.decay_fraction or DEFAULT_DECAY_FRACTION) * total_steps))
