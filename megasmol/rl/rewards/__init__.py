"""RL rewards: ``build_rewards(RewardsConfig) -> Rewards``; ``Rewards.score(records, completions,
completion_lengths, truncated) -> RewardResult(total, per_reward, keep, notes)``. One file per
reward (``math``, ``code``, ``format``, a user's ``module:function``), the overlong penalty, the
registry and the weighted combination (``scoring``)."""

from megasmol.rl.rewards.base import Reward, RewardError
from megasmol.rl.rewards.scoring import RewardResult, Rewards, build_rewards, reward_metrics

__all__ = ["Reward", "RewardError", "RewardResult", "Rewards", "build_rewards", "reward_metrics"]
