"""DAPO's soft overlong punishment (Eq. 13 of the DAPO paper; TRL's
``get_soft_overlong_punishment``), with the lengths of the prompt's reasoning mode."""

from __future__ import annotations

from megasmol.config.rewards import OverlongConfig


def soft_overlong_penalty(length: int, l_max: int, l_cache: int) -> float:
    """0 up to ``l_max - l_cache`` tokens, then ``(l_max - l_cache - length) / l_cache`` down to
    -1 at ``l_max``, and -1 past it."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return (l_max - l_cache - length) / l_cache
    return -1.0


class OverlongPenalty:
    def __init__(self, config: OverlongConfig):
        self.config = config

    def score(self, lengths: list[int], records) -> list[float]:
        out = []
        for length, record in zip(lengths, records):
            limits = self.config.limits(record.mode)
            out.append(0.0 if limits is None else soft_overlong_penalty(length, limits.l_max, limits.l_cache))
        return out
