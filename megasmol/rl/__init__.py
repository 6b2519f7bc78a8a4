"""Reinforcement learning with verifiable rewards (GRPO and its successors, TRL's names).

* ``rewards``: what scores a completion (math, code in the sandbox, format, a user's function,
  DAPO's overlong penalty) and their weights.
* ``order``: which prompts a step draws and each completion's sampling seed (functions of the step).
* ``rollout``: one step's rollouts: prompts drawn, completions sampled by the trainer's own model
  (``decode``), scored, advantages, the step's metrics.
* ``advantages``: rewards of groups of completions -> one advantage per completion, and the
  reward metrics (``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/NAME/...``).
* ``pack``: completions packed as documents; ``batches``: the rollout batch source of the loop.
* ``policy_loss``: per-token log-probabilities of packed completions -> the policy loss of each
  ``rl.loss_type`` as a sum and a count, and its metrics (``clip_ratio/...``, ``kl``...).

The training objective that drives them lives in ``train/objectives/rl.py``.
"""
