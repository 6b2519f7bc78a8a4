"""The weights of a checkpoint average or merge, checked before anything is read (no torch here,
so ``megasmol average`` refuses bad weights at once)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from megasmol.config.typed import ConfigError

WEIGHT_TOLERANCE = 1e-6


def check_weights(weights: Optional[Sequence[float]], count: int, normalize: bool) -> list[float]:
    """The weights to use: equal by default; given ones must be finite, one per checkpoint, and
    sum to 1 unless ``normalize`` is False."""
    if count < 1:
        raise ConfigError("--checkpoints: give at least one checkpoint")
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"--weights: {len(weights)} weights for {count} checkpoints")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"--weights must be finite numbers, got {weights}")
    total = sum(weights)
    if not any(weights):
        raise ConfigError("--weights are all zero: the result would be an all-zero model")
    if normalize and abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ConfigError(f"--weights sum to {total:g}, not 1 (pass --no-normalize to use them "
                          "as given, e.g. for task arithmetic)")
    return weights
