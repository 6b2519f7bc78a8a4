"""Which prompts a step draws, and each completion's sampling seed: pure functions of the step.

Nothing about the prompt sampler or the sampling RNG needs saving: step ``s`` draws the prompts
at positions ``(s - 1) * P .. s * P - 1`` of an endless stream that visits every prompt once per
epoch in a seeded order (a new order each epoch), and completion ``j`` of the prompt drawn at
position ``k`` samples with a generator seeded from ``(seed, s, k, j)``. A resumed run therefore
draws and samples exactly what an uninterrupted one would, and the data-parallel split (prompt
``k`` of a step goes to rank ``k % dp``) changes which rank samples a completion, not what it is.
Dynamic sampling's refills draw from a second seeded stream per step and attempt.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def _epoch_order(num_prompts: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED])).permutation(num_prompts)


def step_prompts(step: int, per_step: int, num_prompts: int, seed: int) -> list[int]:
    """The prompt indices step ``step`` (1-based) draws, in stream order."""
    first = (step - 1) * per_step
    picked = []
    for position in range(first, first + per_step):
        epoch, at = divmod(position, num_prompts)
        picked.append(int(_epoch_order(num_prompts, seed, epoch)[at]))
    return picked


def refill_prompts(step: int, attempt: int, count: int, num_prompts: int, seed: int) -> list[int]:
    """``count`` further prompts for dynamic sampling's refill ``attempt`` (1-based) of ``step``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, attempt, 0xF111]))
    return [int(i) for i in rng.integers(0, num_prompts, size=count)]


def completion_seed(seed: int, step: int, stream: int, position: int, generation: int) -> int:
    """The sampling seed of one completion: ``stream`` 0 for a step's own prompts, the refill
    attempt otherwise; ``position`` the prompt's place in that stream."""
    state = np.random.SeedSequence([seed, step, stream, position, generation]).generate_state(2)
    return int(state[0]) << 32 | int(state[1]) >> 1
