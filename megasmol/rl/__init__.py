"""Reinforcement learning with verifiable rewards (GRPO and its successors, TRL's names).

* ``advantages``: rewards of groups of completions -> one advantage per completion, and the
  reward metrics (``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/NAME/...``).
* ``policy_loss``: per-token log-probabilities of packed completions -> the policy loss of each
  ``rl.loss_type`` as a sum and a count, and its metrics (``clip_ratio/...``, ``kl``...).

Pure tensor functions: the training objective that calls them lives in ``train``.
"""
