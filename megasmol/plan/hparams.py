"""Learning rate and batch size from the compute budget (DeepSeek LLM fits), and the
square-root rule when the batch changes.

DeepSeek LLM (arXiv 2401.02954, section 3.1): eta_opt = 0.3118 C^-0.1250 and
B_opt = 0.2920 C^0.3271 tokens, fitted on their data for C up to ~3e20 FLOPs. Scaling the batch by
k calls for the learning rate times sqrt(k) (Adam; Malladi et al. 2022), valid below the critical
batch size, beyond which a larger batch stops buying fewer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megasmol.errors import InputError

CAVEAT = ("These fits come from one data mixture and C <= ~3e20 FLOPs; treat them as a starting "
          "point for a sweep. Beyond the critical batch size (which grows as the loss falls) a "
          "larger batch no longer cuts the number of steps, and the sqrt(k) LR rule stops holding.")


def deepseek_lr(flops: float) -> float:
    return 0.3118 * flops ** -0.1250


def deepseek_batch_tokens(flops: float) -> float:
    return 0.2920 * flops ** 0.3271


def sqrt_lr_scaling(lr: float, old_batch: float, new_batch: float) -> float:
    """The LR for a batch changed by k = new / old: lr x sqrt(k)."""
    if old_batch <= 0 or new_batch <= 0:
        raise InputError("batch sizes must be > 0")
    return lr * math.sqrt(new_batch / old_batch)


@dataclass
class HyperParameters:
    flops: float
    lr: float
    batch_tokens: float
    seq_length: Optional[int] = None

    def render(self) -> str:
        lines = [f"C = {self.flops:.3e} FLOPs",
                 f"learning rate   eta = 0.3118 C^-0.125  = {self.lr:.3e}",
                 f"batch (tokens)  B   = 0.2920 C^0.3271 = {self.batch_tokens:,.0f}"]
        if self.seq_length:
            lines.append(f"  = {self.batch_tokens / self.seq_length:,.1f} sequences of {self.seq_length}")
        lines.append("note: " + CAVEAT)
        return "\n".join(lines)


def suggest(flops: float, seq_length: Optional[int] = None) -> HyperParameters:
    if not flops > 0:
        raise InputError(f"compute must be > 0 FLOPs, got {flops}")
    return HyperParameters(flops, deepseek_lr(flops), deepseek_batch_tokens(flops), seq_length)
