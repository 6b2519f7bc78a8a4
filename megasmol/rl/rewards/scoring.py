"""Every reward of a run, combined: TRL's ``reward_weights`` (the completion's reward is the
weighted sum of its rewards; one that does not apply to the prompt counts 0 there and is left out
of its own mean, TRL's NaN), plus DAPO's overlong penalty, and each reward's values for the
metrics ``rewards/NAME/mean`` and ``rewards/NAME/std``."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Optional

from megasmol.config.rewards import OVERLONG, RewardsConfig
from megasmol.rl.rewards.base import Reward, RewardError
from megasmol.rl.rewards.overlong import OverlongPenalty
from megasmol.rl.rewards.registry import make_reward


@dataclass
class RewardResult:
    total: list[float]
    """The reward of each completion: sum over rewards of weight x value (+ the overlong
    penalty x its weight)."""
    per_reward: dict[str, list[float]]
    """{reward name: its value for each completion}, NaN where it does not apply to the prompt;
    ``overlong`` holds the penalty when it is on."""
    keep: list[bool]
    """False for a truncated completion under ``mask_truncated_completions`` (no loss on it)."""
    notes: list[str] = field(default_factory=list)
    """Lines for the console (programs not run within the code reward's budget)."""

    def metrics(self) -> dict[str, float]:
        """``rewards/NAME/mean`` and ``rewards/NAME/std`` (TRL's: NaN values left out, the std with
        Bessel's correction, NaN below two values)."""
        return reward_metrics(self.per_reward)


def reward_metrics(per_reward: dict[str, list[float]]) -> dict[str, float]:
    """The per-reward metrics of any (e.g. gathered) per-reward values."""
    out = {}
    for name, values in per_reward.items():
        present = [v for v in values if not math.isnan(v)]
        out[f"rewards/{name}/mean"] = statistics.fmean(present) if present else math.nan
        out[f"rewards/{name}/std"] = statistics.stdev(present) if len(present) > 1 else math.nan
    return out


class Rewards:
    """The run's rewards; :meth:`score` a batch of completions, :meth:`close` at the end."""

    def __init__(self, config: RewardsConfig, rewards: list[Reward]):
        self.config, self.rewards = config, rewards
        self.weights = [spec.weight for spec in config.functions]
        self.overlong = OverlongPenalty(config.overlong) if config.overlong.enabled else None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards] + ([OVERLONG] if self.overlong else [])

    def score(self, records: list, completions: list[str], completion_lengths: list[int],
              truncated: list[bool]) -> RewardResult:
        n = len(completions)
        if not len(records) == len(completion_lengths) == len(truncated) == n:
            raise ValueError(f"rewards: {len(records)} records, {n} completions, "
                             f"{len(completion_lengths)} lengths, {len(truncated)} truncation flags")
        per_reward: dict[str, list[float]] = {}
        total = [0.0] * n
        scored = [False] * n
        for reward, weight in zip(self.rewards, self.weights):
            values: list[Optional[float]] = reward.score(completions, records)
            if len(values) != n:  # a built-in's own bug, said as plainly as a user's
                raise RewardError(f"reward {reward.name} gave {len(values)} value(s) for {n} completion(s)")
            per_reward[reward.name] = [math.nan if v is None else v for v in values]
            for i, value in enumerate(values):
                if value is not None:
                    total[i] += weight * value
                    scored[i] = True
        if not all(scored):
            index = scored.index(False)
            raise RewardError(f"sample {index} (from {records[index].where or '?'}): none of the rewards "
                              f"({', '.join(r.name for r in self.rewards)}) applies to its prompt "
                              f"(answer: {records[index].answer is not None}, tests: "
                              f"{records[index].tests is not None})")
        if self.overlong is not None:
            penalty = self.overlong.score(completion_lengths, records)
            per_reward[OVERLONG] = penalty
            total = [t + self.config.overlong.weight * p for t, p in zip(total, penalty)]
        keep = [not t for t in truncated] if self.config.mask_truncated_completions else [True] * n
        notes = [line for reward in self.rewards for line in reward.notes()]
        return RewardResult(total, per_reward, keep, notes)

    def close(self) -> None:
        for reward in self.rewards:
            reward.close()

    def __enter__(self) -> Rewards:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_rewards(config: RewardsConfig) -> Rewards:
    """The rewards ``config`` names, ready to score (a code reward checks the sandbox here)."""
    built: list[Reward] = []
    try:
        for spec in config.functions:
            built.append(make_reward(spec))
    except BaseException:
        for reward in built:
            reward.close()
        raise
    return Rewards(config, built)
