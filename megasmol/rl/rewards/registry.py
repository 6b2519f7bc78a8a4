"""Reward names to implementations: the built-ins by name (the names and options
``config/rewards.py`` accepts), anything else a user's ``module:function``."""

from __future__ import annotations

from megasmol.config.rewards import RewardSpec
from megasmol.rl.rewards.base import Reward
from megasmol.rl.rewards.code import CodeReward
from megasmol.rl.rewards.format import FormatReward
from megasmol.rl.rewards.math import MathReward
from megasmol.rl.rewards.user import UserReward

BUILTIN: dict[str, type[Reward]] = {"math": MathReward, "code": CodeReward, "format": FormatReward}


def make_reward(spec: RewardSpec) -> Reward:
    return BUILTIN.get(spec.name, UserReward)(spec)
