"""What decoding returns for each prompt, and the rule that ends a row (shared by the one-process
and the parallel-layout decoders)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from megasmol.errors import InputError

FinishReason = Literal["eos", "stop", "length"]

Stop = Callable[[int, list[int]], bool]
"""``stop(row, new ids so far)``: True once the row is done (e.g. it wrote a stop string)."""

OnStep = Callable[[int, int], None]
"""``on_step(ids generated this step, rows finished this step)``, for a progress bar."""


@dataclass
class Completion:
    """One prompt's new tokens."""

    tokens: list[int]
    """The generated ids, the EOS id included when it ended the row."""
    logprobs: list[float]
    """``log_softmax(logits / T)`` at each of ``tokens`` (T: the temperature, 1 when greedy), in
    float32 from the logits the token was chosen from; ``top_k`` / ``top_p`` do not change it."""
    finish_reason: FinishReason
    """``eos``: it wrote the EOS id; ``stop``: the ``stop`` rule ended it; ``length``: it reached
    its ``max_new_tokens`` (checked in that order after each token)."""
    entropies: list[float] = field(default_factory=list)
    """The entropy (nats) of ``softmax(logits / T)`` over the whole vocabulary at each of
    ``tokens`` (before ``top_k`` / ``top_p``): TRL's per-token ``entropy``, from the same logits."""


def finish_reason(row: int, new: list[int], limit: int, eos_token_id: Optional[int],
                  stop: Optional[Stop]) -> Optional[FinishReason]:
    """Why ``row`` ends after its latest token ``new[-1]``, or None while it goes on."""
    if eos_token_id is not None and new[-1] == eos_token_id:
        return "eos"
    if stop is not None and stop(row, new):
        return "stop"
    if len(new) >= limit:
        return "length"
    return None


def request_limits(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int]) -> list[int]:
    """Each prompt's token limit (one number for all, or one each), checked."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise InputError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
    if any(n < 0 for n in limits):
        raise InputError(f"max_new_tokens must be >= 0, got {min(limits)}")
    if any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    return limits


def request_seeds(rows: int, seeds: Optional[Sequence[int]], sampled: bool) -> list[int]:
    """Each row's sampling seed: ``seeds``, or (when sampling without them) drawn from torch's
    global generator, so ``torch.manual_seed`` still makes a run repeat."""
    if seeds is None:
        return torch.randint(2**62, (rows,)).tolist() if sampled else [0] * rows
    if len(seeds) != rows:
        raise InputError(f"seeds has {len(seeds)} entries for {rows} prompts")
    return [int(s) for s in seeds]
