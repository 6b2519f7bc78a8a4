"""Group-relative advantages, as TRL 1.16's ``GRPOTrainer`` computes them.

Rewards come as one flat tensor ``[num_prompts * num_generations]``, the completions of a prompt
next to each other (TRL's order: each prompt repeated ``num_generations`` times). They are the
whole step's rewards, over every data-parallel rank: the group mean and the ``batch`` deviation
are taken over all of them (TRL gathers the rewards of all processes first), each rank then
keeps its own completions' advantages.

Standard deviations are the unbiased ones (Bessel's correction, TRL's ``nanstd``) and the
divisor is ``std + 1e-4``. TRL computes in float32: pass float32 rewards for bit-equal results.
Rewards must be finite (a reward function that returns NaN is refused before this; TRL's
all-``None`` "unscorable" rows have no counterpart here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

STD_EPSILON = 1e-4
"""Added to the reward deviation before dividing (TRL's constant)."""

ScaleRewards = Literal["group", "batch", "none"]


@dataclass
class Advantages:
    """One step's advantages and the reward metrics TRL logs for it."""

    advantages: Tensor
    """``[num_prompts * num_generations]``: reward minus its group's mean, scaled per ``scale_rewards``."""
    zero_std: Tensor
    """``[num_prompts * num_generations]`` bool: the deviation the completion's reward is scaled
    by (its group's; the batch's for ``scale_rewards: batch``) is zero, TRL's ``is_std_zero``."""
    metrics: dict[str, float]
    """``reward`` (mean), ``reward_std`` (unbiased, over the step) and ``frac_reward_zero_std``
    (the fraction of completions whose ``zero_std`` holds)."""


def _std(values: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased standard deviation, in TRL's ``nanstd``'s order of operations (no NaNs here):
    the mean square deviation times n / (n - 1); NaN for a single value."""
    count = values.numel() if dim is None else values.shape[dim]
    mean = values.mean() if dim is None else values.mean(dim=dim, keepdim=True)
    square = (values - mean) ** 2
    variance = square.mean() if dim is None else square.mean(dim=dim)
    correction = count / (count - 1) if count > 1 else float("nan")
    return torch.sqrt(variance * correction)


def group_advantages(rewards: Tensor, num_generations: int,
                     scale_rewards: ScaleRewards = "group") -> Advantages:
    """Advantages of ``rewards`` ``[num_prompts * num_generations]`` (groups contiguous)."""
    if rewards.dim() != 1 or rewards.numel() == 0 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be one flat tensor of whole groups of {num_generations}, "
                         f"got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):  # "none": the group deviation is still what zero_std reports
        std = (_std(grouped, dim=1) if num_generations > 1
               else torch.zeros(grouped.shape[0], dtype=rewards.dtype, device=rewards.device))
        std = std.repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = (_std(rewards) if rewards.numel() > 1
               else torch.zeros((), dtype=rewards.dtype, device=rewards.device)).expand_as(rewards)
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    reward_std = _std(rewards).item() if rewards.numel() > 1 else float("nan")
    metrics = {"reward": rewards.mean().item(), "reward_std": reward_std,
               "frac_reward_zero_std": zero_std.float().mean().item()}
    return Advantages(advantages, zero_std, metrics)


def zero_std_groups(rewards: Tensor, num_generations: int) -> Tensor:
    """``[num_prompts]`` bool: the groups whose rewards are all equal (TRL's zero-deviation test):
    their advantages are all 0 and they carry no gradient (dynamic sampling drops them)."""
    std = _std(rewards.view(-1, num_generations), dim=1)
    return torch.isclose(std, torch.zeros_like(std))


def reward_function_metrics(per_function: Mapping[str, Tensor]) -> dict[str, float]:
    """``rewards/NAME/mean`` and ``rewards/NAME/std`` (unbiased) of each reward function's
    unweighted rewards over the step, as TRL logs them; NaN entries (a function that does not
    apply to a sample) are left out of both."""
    out = {}
    for name, values in per_function.items():
        kept = values[~torch.isnan(values)]
        out[f"rewards/{name}/mean"] = kept.mean().item() if kept.numel() else float("nan")
        out[f"rewards/{name}/std"] = _std(kept).item() if kept.numel() > 1 else float("nan")
    return out
