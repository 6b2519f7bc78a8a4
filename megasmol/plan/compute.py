"""Compute budget and cluster sizing: C = 6 N D, GPUs for a deadline, time for a GPU count.

N parameters, D training tokens, per-GPU peak FLOP/s and the MFU a run achieves. The playbook's
example: 3B parameters, 11T tokens, 4 weeks at 30% MFU on H100 (720 TFLOP/s used there) gives
6 x 3e9 x 11e12 / (720e12 x 0.30 x 2,419,200 s) = ~379 GPUs (SmolLM3 reserved 384).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megasmol.errors import InputError

SECONDS_PER_DAY = 86400.0
# Dense bf16 peak TFLOP/s per GPU (datasheets, no sparsity).
GPU_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "b200": 2250.0, "mi300x": 1307.0}


def training_flops(parameters: float, tokens: float) -> float:
    """C = 6 N D: forward (2 N D) plus backward (4 N D) FLOPs."""
    return 6.0 * parameters * tokens


@dataclass
class Sizing:
    parameters: float
    tokens: float
    peak_tflops: float
    mfu: float
    flops: float
    gpus: float
    days: float

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu / (6.0 * self.parameters)

    def render(self) -> str:
        return "\n".join([
            f"compute C = 6 N D = 6 x {self.parameters:.3g} x {self.tokens:.3g} = {self.flops:.3e} FLOPs",
            f"per GPU: {self.peak_tflops:g} TFLOP/s peak x {100 * self.mfu:g}% MFU = "
            f"{self.peak_tflops * self.mfu:.1f} TFLOP/s achieved = "
            f"{self.tokens_per_second_per_gpu:,.0f} tokens/s/GPU",
            f"GPUs: {self.gpus:,.1f} (round up to {int(-(-self.gpus // 1)):,}) for {self.days:g} days "
            f"({self.days / 7:.2f} weeks)",
            f"GPU-hours: {self.gpus * self.days * 24:,.0f}",
        ])


def size_cluster(parameters: float, tokens: float, peak_tflops: float, mfu: float, *,
                 days: Optional[float] = None, gpus: Optional[float] = None) -> Sizing:
    """Give ``days`` to get the GPU count, or ``gpus`` to get the days."""
    if (days is None) == (gpus is None):
        raise InputError("give exactly one of days (-> GPUs needed) or gpus (-> days needed)")
    for name, value in (("parameters", parameters), ("tokens", tokens), ("peak_tflops", peak_tflops)):
        if not value > 0:
            raise InputError(f"{name} must be > 0, got {value}")
    if not 0 < mfu <= 1:
        raise InputError(f"mfu must be in (0, 1], got {mfu}")
    flops = training_flops(parameters, tokens)
    per_gpu = peak_tflops * 1e12 * mfu
    if days is not None:
        gpus = flops / (per_gpu * days * SECONDS_PER_DAY)
    else:
        days = flops / (per_gpu * gpus) / SECONDS_PER_DAY
    return Sizing(parameters, tokens, peak_tflops, mfu, flops, gpus, days)
