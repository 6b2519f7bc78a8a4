"""How far two sets of log-probabilities of the same tokens are apart: a rollout engine's (what it
sampled with) and a trainer's (what the loss uses), or two engines'.

* :func:`mult_prob_error_sum`: NeMo-RL's ``token_mult_prob_error`` as a sum and a count, so that
  micro-batches and ranks add up before the one division (NeMo-RL normalizes each micro-batch's
  terms by the step's number of valid tokens, which is the same mean).
* :func:`compare_logps`: the whole comparison of ``megasmol rl check-engine``: the largest and
  the mean absolute difference, ``token_mult_prob_error`` and the verdict against a threshold
  on ``token_mult_prob_error`` (:data:`PASS_BELOW`: NeMo-RL's CI bound).

``token_mult_prob_error`` is the mean, over the trained completion tokens, of
``exp(|logp_rollout - logp_trainer|)``: the factor by which the two probabilities of a token
differ (either way round), 1 when the two agree exactly. NeMo-RL logs it per step to catch an
inference engine drifting from the trainer; a healthy run stays within a few percent of 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the functions: the CLI imports this module's constants
    from torch import Tensor

TOKEN_MULT_PROB_ERROR = "token_mult_prob_error"
"""The metric's name in ``metrics.jsonl`` (NeMo-RL's, without its ``train/`` prefix)."""

PASS_BELOW = 1.05
"""The engine check's default verdict: ``token_mult_prob_error`` at most this (NeMo-RL's CI runs
assert ``max(train/token_mult_prob_error) < 1.05``)."""


def mult_prob_error_sum(rollout: Tensor, trainer: Tensor, mask: Tensor) -> tuple[float, float]:
    """``(sum of exp(|rollout - trainer|) over the tokens where mask > 0, their number)``, in
    float64. The tensors are per-token log-probabilities of the same shape; the mask is 1 on
    the trained completion tokens."""
    keep = mask.reshape(-1) > 0
    diff = (rollout.reshape(-1).double() - trainer.reshape(-1).double())[keep].abs()
    return float(diff.exp().sum()), float(keep.sum())


def token_mult_prob_error(rollout: Tensor, trainer: Tensor, mask: Tensor) -> float:
    """NeMo-RL's ``token_mult_prob_error`` of one set of tokens (NaN when the mask is empty)."""
    total, count = mult_prob_error_sum(rollout, trainer, mask)
    return total / count if count else float("nan")


@dataclass
class LogpComparison:
    """Two engines' log-probabilities of the same sampled tokens, compared."""

    tokens: int
    """Completion tokens compared."""
    max_abs_diff: float
    """The largest |logp_a - logp_b|."""
    mean_abs_diff: float
    """The mean |logp_a - logp_b|."""
    token_mult_prob_error: float
    """NeMo-RL's: the mean of exp(|logp_a - logp_b|) (1: identical)."""
    threshold: float
    """The largest ``token_mult_prob_error`` that passes (the mean, not the largest difference:
    in bf16 a few unlikely tokens differ by tenths of a nat between two correct kernels)."""

    @property
    def passed(self) -> bool:
        return self.tokens > 0 and self.token_mult_prob_error <= self.threshold


def compare_logps(reference: Tensor, candidate: Tensor, mask: Tensor, threshold: float) -> LogpComparison:
    """``reference`` and ``candidate``: per-token log-probabilities of the same tokens (any equal
    shapes, e.g. [completions, longest] padded); ``mask``: 1 where a token was generated. No
    token compared fails the check."""
    if reference.shape != candidate.shape or reference.shape != mask.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(reference.shape)}, {tuple(candidate.shape)}, "
                         f"mask {tuple(mask.shape)}")
    keep = mask.reshape(-1) > 0
    diff = (reference.reshape(-1).double() - candidate.reshape(-1).double())[keep].abs()
    if not diff.numel():
        return LogpComparison(0, float("nan"), float("nan"), float("nan"), threshold)
    return LogpComparison(int(diff.numel()), float(diff.max()), float(diff.mean()),
                          float(diff.exp().mean()), threshold)


def padded(rows: list[list[float]]) -> tuple[Tensor, Tensor]:
    """Ragged per-completion lists -> ([rows, longest] float64 values, [rows, longest] mask)."""
    import torch

    longest = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), longest, dtype=torch.float64)
    mask = torch.zeros(len(rows), longest, dtype=torch.float64)
    for i, row in enumerate(rows):
        values[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, :len(row)] = 1.0
    return values, mask
