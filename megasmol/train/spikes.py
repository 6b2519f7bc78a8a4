"""Loss-spike detection against a running window.

A step's loss is a spike when it is NaN/inf, or (once the window holds ``warmup_steps`` losses)
when it exceeds the window mean by ``threshold`` standard deviations and by
``min_relative_rise`` of the mean. Spikes do not enter the window, so one bad batch cannot
raise the bar for the next. The window is part of the checkpointed train state, so detection
after a resume is the same as without one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

from megasmol.config.sections import SpikeConfig


@dataclass
class SpikeVerdict:
    step: int
    loss: float
    mean: Optional[float]
    std: Optional[float]

    def describe(self) -> str:
        if self.mean is None or self.std is None:
            return f"step {self.step}: loss {self.loss} is not finite"
        return (f"step {self.step}: loss {self.loss:.4f} vs window mean {self.mean:.4f} "
                f"(std {self.std:.4f}, {(self.loss - self.mean) / max(self.std, 1e-12):.1f} sigma)")


class SpikeDetector:
    def __init__(self, config: SpikeConfig, history: Optional[list[float]] = None):
        self.config = config
        self.window: deque[float] = deque(history or [], maxlen=config.window)

    def check(self, step: int, loss: float) -> Optional[SpikeVerdict]:
        """A verdict when ``loss`` is a spike; otherwise records it and returns None."""
        if not math.isfinite(loss):
            return SpikeVerdict(step, loss, None, None)
        if len(self.window) >= self.config.warmup_steps:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            rise = loss - mean
            if rise > self.config.threshold * std and rise > self.config.min_relative_rise * abs(mean):
                return SpikeVerdict(step, loss, mean, std)
        self.window.append(loss)
        return None

    def state(self) -> list[float]:
        return list(self.window)
