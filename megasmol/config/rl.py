"""The ``rl:`` run-config section: reinforcement learning with verifiable rewards (GRPO and its
successors). Field names, meanings and defaults are TRL 1.16's ``GRPOConfig``'s unless a field's
docstring says otherwise; the loss itself is :mod:`megasmol.rl.policy_loss`, the advantages
:mod:`megasmol.rl.advantages`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megasmol.config.typed import ConfigError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
"""The ``rl.loss_type`` values (:data:`megasmol.rl.policy_loss.LOSSES` has one entry for each)."""
SUM_OVER_TOKENS = ("bnpo", "dr_grpo", "dapo", "cispo")
"""Loss types that add up per-token terms over the batch: with ``importance_sampling_level:
sequence`` each completion then weighs as much as it has tokens (TRL warns, see :meth:`RLConfig.cautions`)."""


@dataclass
class RLConfig:
    """How completions are sampled, scored into advantages and turned into a policy loss.

    The prompts are the data recipe's datasets (``megasmol prepare-prompts`` output), and
    ``training.global_batch_size`` counts the completions of one optimizer step over every rank
    (TRL's generation batch): ``global_batch_size / num_generations`` prompts per step, each
    rollout batch one optimizer step (TRL's ``steps_per_generation`` = gradient accumulation
    steps, its default), used ``num_iterations`` times."""

    engine: Literal["megasmol", "megatron-dynamic"] = "megasmol"
    """Which engine samples the rollouts (the entries of ``train/rollout_engines.py``), always
    over the trainer's own model in the same process. ``megasmol`` (default): megasmol's decoder,
    on any device and parallel layout, one seeded generator per completion, exactly on-policy.
    ``megatron-dynamic``: Megatron-Core's ``DynamicInferenceEngine`` (continuous batching, paged
    KV cache) for GPU speed: CUDA, flash-attn and data parallelism only, one generator per call,
    no ``entropy`` metric; check it against ``megasmol`` on a GPU node with ``megasmol rl
    check-engine`` (docs/rl.md). Not in TRL."""
    num_generations: int = 8
    """Completions sampled per prompt: a group, whose rewards give each completion its advantage.
    At least 2 (one completion has no group variance to learn from); divides
    ``training.global_batch_size``."""
    max_completion_length: int = 512
    """Most tokens generated per completion; a completion stopped here is truncated. Also the
    constant ``dr_grpo`` divides by."""
    temperature: float = 1.0
    """Sampling temperature; the log-probabilities the loss uses are those of the logits divided
    by it (TRL's, and the rollout's). Must be > 0: greedy completions of a prompt are all equal."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities add up to
    ``top_p`` (1: all). Restricts the choice only; log-probabilities stay the full softmax's."""
    top_k: int = 0
    """Sample among the ``top_k`` most likely tokens (0: all). Restricts the choice only."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = "dapo"
    """How per-token terms become the loss. ``dapo`` (TRL's default): clipped surrogate summed over
    the step's completion tokens, divided by their number. ``grpo``: each completion's token mean,
    averaged over completions (favours short right answers and long wrong ones). ``dr_grpo``: token
    sum divided by completions x ``max_completion_length`` (Dr. GRPO). ``bnpo``: token mean over
    the batch (TRL: over each process's micro-batch; here over the step, i.e. ``dapo``'s
    normalization with ``grpo``'s clip). ``cispo``: the importance weight itself clipped at
    ``epsilon_high`` and detached, times advantage times log-prob (MiniMax-M1), token mean over the
    step. ``sapo``: a sigmoid gate instead of the hard clip (SAPO), averaged as ``grpo``."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """``token``: one importance weight per token, exp(logp - old_logp). ``sequence`` (GSPO): one
    per completion, exp of the mean of its tokens' log-ratios; GSPO's setup is ``loss_type: grpo``."""
    epsilon: float = 0.2
    """Lower clip: importance weights below ``1 - epsilon`` stop pulling (tokens with negative
    advantage). In (0, 1)."""
    epsilon_high: Optional[float] = None
    """Upper clip (clip-higher; DAPO: 0.28): weights above ``1 + epsilon_high`` stop pushing (tokens
    with positive advantage). Default: ``epsilon``. For ``cispo`` it is the cap on the weight
    itself (ScaleRL: 5.0) and must be given (TRL would silently cap at ``epsilon``, 0.2)."""
    delta: Optional[float] = None
    """Two-sided clipping (INTELLECT-2): the importance weight is also capped at ``delta``, for
    negative advantages too (> 1; recommended above ``1 + epsilon_high``). None: off. Clip-based
    loss types only."""
    sapo_temperature_pos: float = 1.0
    """``sapo``: gate temperature for tokens with positive advantage."""
    sapo_temperature_neg: float = 1.05
    """``sapo``: gate temperature for tokens with zero or negative advantage."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage = reward minus its group's mean, divided by: ``group``: the group's standard
    deviation (GRPO); ``batch``: the whole step's (PPO-Lite); ``none``: nothing (Dr. GRPO). The
    deviation is the unbiased one plus 1e-4, as TRL's."""
    beta: float = 0.0
    """Weight of the KL to the reference model (k3 estimator, per token; DeepSeek-R1: 0.001).
    0 (default, as TRL and verl): no reference model is run and no ``kl`` is logged."""
    use_bias_correction_kl: bool = True
    """Multiply the per-token KL by the importance weight (DeepSeek-V3.2), which makes its gradient
    the unbiased reverse-KL one; TRL 1.16's default. The weight is differentiable, so this changes
    the KL gradient even on-policy, where its value is 1. No effect when ``beta`` is 0."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (mu in the GRPO paper): the batch's log-probabilities at
    sampling time are kept as the old ones the importance weights divide by. 1: exactly
    on-policy, the old log-probs are the current ones detached."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal (zero advantage, no gradient)
    are dropped and more prompts are sampled until the step has its number of groups with
    signal, or ``max_refills`` more rollout rounds were run (then the step trains on the groups
    it has and says so). Not in TRL."""
    max_refills: int = 4
    """With ``dynamic_sampling``: most extra rollout rounds per step (verl's
    ``max_num_gen_batches`` - 1)."""

    @property
    def clip_high(self) -> float:
        """``epsilon_high``, or ``epsilon`` when unset (TRL's ``epsilon_high`` default)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> None:
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ConfigError(f"rl.num_generations must be >= 2 (a group of one has no reward "
                              f"variance to learn from), got {self.num_generations}")
        if not self.temperature > 0:
            raise ConfigError(f"rl.temperature must be > 0 (greedy completions of a prompt are all "
                              f"equal), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rl.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"rl.top_k must be >= 0 (0: all tokens), got {self.top_k}")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"rl.epsilon must be in (0, 1), got {self.epsilon}")
        if self.loss_type == "cispo":
            if self.epsilon_high is None:
                raise ConfigError("rl.epsilon_high must be given with rl.loss_type cispo (the cap on "
                                  "the importance weight; ScaleRL: 5.0)")
            if not self.epsilon_high > 0:
                raise ConfigError(f"rl.epsilon_high must be > 0, got {self.epsilon_high}")
        elif self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ConfigError(f"rl.epsilon_high ({self.epsilon_high}) must be >= rl.epsilon "
                              f"({self.epsilon}): clip-higher widens the upper clip")
        if self.delta is not None:
            if self.loss_type in ("cispo", "sapo"):
                raise ConfigError(f"rl.delta (two-sided clipping) applies to the clipped loss types, "
                                  f"not rl.loss_type {self.loss_type}")
            if not self.delta > 1:
                raise ConfigError(f"rl.delta must be > 1 (a cap below 1 clips on-policy tokens), "
                                  f"got {self.delta}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"rl.{name} must be > 0, got {getattr(self, name)}")
        if self.beta < 0:
            raise ConfigError(f"rl.beta must be >= 0 (0: no KL term), got {self.beta}")
        if self.max_refills < 0:
            raise ConfigError(f"rl.max_refills must be >= 0, got {self.max_refills}")

    def cautions(self) -> list[str]:
        """Allowed but probably unintended combinations, one line each (TRL warns of the same)."""
        lines = []
        if self.importance_sampling_level == "sequence" and self.loss_type in SUM_OVER_TOKENS:
            lines.append(f"rl.importance_sampling_level sequence with rl.loss_type {self.loss_type} "
                         "weighs each completion by its length; GSPO's setup is rl.loss_type grpo")
        return lines
