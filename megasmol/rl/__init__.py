"""Reinforcement learning with verifiable rewards (GRPO family, TRL's names): rewards
(:mod:`megasmol.rl.rewards`), advantages and the policy loss; the training loop drives them."""
