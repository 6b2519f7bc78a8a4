"""Packing whole conversations into training sequences.

``ffd`` (first-fit-decreasing): conversations sorted longest first (ties by index, so the plan is
a pure function of the lengths) each go into the first sequence with room for all of it; none is
ever split. ``none``: one conversation per sequence, padded. The plan is two arrays -- the
conversation ids in placement order and each sequence's offset into them -- cached beside the
dataset indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PACKING = ("ffd", "none")


@dataclass
class PackingPlan:
    order: np.ndarray
    """Conversation ids (positions in the split) grouped by sequence."""
    bounds: np.ndarray
    """[num_sequences + 1] offsets of each sequence's conversations in ``order``."""
    capacity: int
    """Tokens per packed row (sequence length + 1: inputs and shifted labels)."""
    tokens: int
    """Conversation tokens placed (padding excluded)."""

    @property
    def num_sequences(self) -> int:
        return len(self.bounds) - 1

    @property
    def efficiency(self) -> float:
        """Share of packed positions holding conversation tokens rather than padding."""
        return self.tokens / max(1, self.num_sequences * self.capacity)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices; a max-segment-tree over remaining room finds each item's first fit
    in O(log n)."""
    n = len(lengths)
    size = 1
    while size < max(1, n):
        size *= 2
    room = [capacity] * (2 * size)  # leaves: bins in opening order; unopened bins are empty
    bins: list[list[int]] = []
    for item in sorted(range(n), key=lambda i: (-int(lengths[i]), i)):
        need = int(lengths[item])
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def plan_packing(lengths: np.ndarray, capacity: int, packing: str) -> PackingPlan:
    if packing not in PACKING:
        raise ValueError(f"unknown packing {packing!r}; known: {', '.join(PACKING)}")
    bins = first_fit_decreasing(lengths, capacity) if packing == "ffd" else [[i] for i in range(len(lengths))]
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    bounds = np.zeros(len(bins) + 1, dtype=np.int64)
    bounds[1:] = np.cumsum([len(b) for b in bins])
    return PackingPlan(order, bounds, capacity, int(np.sum(lengths)))
