"""The GRPO-family policy loss on packed completions, as TRL 1.16's ``GRPOTrainer._compute_loss``.

Completions arrive packed as documents in flat per-token tensors: the trainer's log-probabilities
``logps`` (with autograd), the old ones the importance weights divide by, the reference ones for
the KL term, each token's advantage (its completion's), a ``mask`` of the tokens that are scored
(completion tokens only) and ``seq_id``, which completion a token belongs to. :func:`policy_loss`
returns the micro-batch's loss as a SUM and a COUNT, so that the step's global sum divided by its
global count (Megatron-Core's ``calculate_per_token_loss``) is TRL's loss on the same completions
for one process and one gradient-accumulation step:

========  ==============================================================  ============
loss      TRL's aggregation                                               count
========  ==============================================================  ============
grpo      mean over completions of each completion's token mean           completions
sapo      as grpo                                                         completions
dr_grpo   token sum / (completions x ``max_completion_length``)           completions
dapo      token sum / tokens of the step                                  tokens
cispo     as dapo                                                         tokens
bnpo      token sum / tokens                                              tokens
========  ==============================================================  ============

Where a multi-process or gradient-accumulating TRL run normalizes differently: TRL's ``grpo``,
``sapo`` and ``dr_grpo`` average per micro-batch and then over micro-batches and processes, which
equals the global mean because its micro-batches hold equally many completions; ``dapo`` and
``cispo`` divide by the global token count, as here; ``bnpo`` divides by each process's
micro-batch token count and then averages, which differs from this global token mean when
micro-batches hold different numbers of tokens. TRL's logged metrics are averages of
per-micro-batch values (per-process min / max for ``clip_ratio/low_min`` / ``high_max``); here
they are the step's global means, min and max (the same for one micro-batch).

Every sum is a sum over tokens (a per-completion quantity is spread over its tokens, weighted by
one over its token count), so a completion split over context-parallel ranks adds up right:
``reduce_segments`` (the group's autograd all-reduce) makes the per-completion sums (token counts,
the sequence-level log-ratio) whole on every rank, and only the ``reporting`` rank counts
completions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from megasmol.config.rl import RLConfig


@dataclass(frozen=True)
class Terms:
    """What every loss type reads, per token (sequence-level weights already spread over tokens)."""

    coef: Tensor
    """The importance weight exp(log-ratio), with autograd."""
    advantages: Tensor
    logps: Tensor
    config: RLConfig


def _clipped(terms: Terms) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (grpo, dr_grpo, dapo, bnpo), with ``delta``'s two-sided cap."""
    cfg, coef, adv = terms.config, terms.coef, terms.advantages
    clipped = torch.clamp(coef, 1 - cfg.epsilon, 1 + cfg.clip_high)
    if cfg.delta is not None:
        coef = torch.clamp(coef, max=cfg.delta)  # TRL's clip metrics then read the capped weight too
    loss = -torch.min(coef * adv, clipped * adv)
    low = (coef < 1 - cfg.epsilon) & (adv < 0)
    high = (coef > 1 + cfg.clip_high) & (adv > 0)
    return loss, {"clip_ratio/low": low, "clip_ratio/high": high, "clip_ratio/region": low | high}


def _cispo(terms: Terms) -> tuple[Tensor, dict[str, Tensor]]:
    """MiniMax-M1: the weight capped at ``epsilon_high`` and detached, times advantage times log-prob."""
    cfg, coef, adv = terms.config, terms.coef, terms.advantages
    loss = -torch.clamp(coef, max=cfg.clip_high).detach() * adv * terms.logps
    return loss, {"cispo_clip_ratio": (coef > cfg.clip_high) & (adv > 0)}


def _sapo(terms: Terms) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO: a sigmoid gate of temperature tau, 4 sigma(tau (w - 1)) / tau, instead of the clip."""
    cfg, adv = terms.config, terms.advantages
    tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(terms.coef.dtype)
    return -torch.sigmoid(tau * (terms.coef - 1)) * 4 / tau * adv, {}


Aggregation = Literal["completion_mean", "token_sum", "max_length"]


@dataclass(frozen=True)
class Loss:
    """One ``rl.loss_type``: its per-token surrogate and how the tokens add up."""

    surrogate: Callable[[Terms], tuple[Tensor, dict[str, Tensor]]]
    """Per-token loss (before the KL term) and the per-token indicators its metrics count."""
    aggregation: Aggregation
    """``completion_mean``: each completion's token mean, averaged (count: completions);
    ``token_sum``: over tokens (count: tokens); ``max_length``: token sum over
    ``max_completion_length`` (count: completions)."""
    min_max: tuple[tuple[str, str, str], ...] = ()
    """``(indicator, metric, "min" | "max")``: per-completion means of an indicator reduced over
    completions (TRL's ``clip_ratio/low_min``, ``clip_ratio/high_max``)."""

    @property
    def unit(self) -> str:
        """What the count counts."""
        return "tokens" if self.aggregation == "token_sum" else "completions"


_CLIP_MIN_MAX = (("clip_ratio/low", "clip_ratio/low_min", "min"),
                 ("clip_ratio/high", "clip_ratio/high_max", "max"))
LOSSES: dict[str, Loss] = {
    "grpo": Loss(_clipped, "completion_mean", _CLIP_MIN_MAX),
    "dr_grpo": Loss(_clipped, "max_length", _CLIP_MIN_MAX),
    "dapo": Loss(_clipped, "token_sum", _CLIP_MIN_MAX),
    "bnpo": Loss(_clipped, "token_sum", _CLIP_MIN_MAX),
    "cispo": Loss(_cispo, "token_sum"),
    "sapo": Loss(_sapo, "completion_mean"),
}
"""``rl.loss_type`` -> its loss (:data:`megasmol.config.rl.LOSS_TYPES` names the same)."""


@dataclass
class PolicyLossSums:
    """One micro-batch's policy loss and metrics, as sums to all-reduce over the step."""

    loss_sum: Tensor
    """Scalar with autograd: the sum whose global total over ``count`` is the loss."""
    count: Tensor
    """Scalar: completions or tokens (see the module's table; :attr:`Loss.unit`)."""
    sums: dict[str, Tensor]
    """Detached float64 scalars to all-reduce with SUM: ``tokens``, ``completions`` and the
    numerators of the mean metrics (``kl``, ``entropy``, ``clip_ratio/low``, ...)."""
    mins: dict[str, Tensor]
    """Detached float64 scalars to all-reduce with MIN (``clip_ratio/low_min``; inf: none)."""
    maxs: dict[str, Tensor]
    """Detached float64 scalars to all-reduce with MAX (``clip_ratio/high_max``; -inf: none)."""


_EMPTY_MIN = torch.tensor(float("inf"), dtype=torch.float64)
"""The MIN reduction's identity (and minus it MAX's): a micro-batch without completions."""


def _segment_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, values)


def policy_loss(config: RLConfig, logps: Tensor, advantages: Tensor, mask: Tensor, seq_id: Tensor,
                num_sequences: int, *, old_logps: Tensor | None = None,
                ref_logps: Tensor | None = None, entropies: Tensor | None = None,
                reduce_segments: Callable[[Tensor], Tensor] | None = None,
                reporting: bool = True) -> PolicyLossSums:
    """The policy loss of ``config.loss_type`` on one micro-batch of packed completions.

    All per-token tensors are flat ``[tokens]``: ``logps`` (the trainer's, of the sampled tokens,
    from the logits divided by the temperature; with autograd), ``advantages`` (the token's
    completion's), ``mask`` (1 on the completion tokens that are scored), ``seq_id`` (the token's
    completion, in ``[0, num_sequences)``; any value where ``mask`` is 0). ``num_sequences``: the
    completions of the micro-batch, fully masked ones included (TRL counts them). ``old_logps``:
    the log-probs at sampling time (None: ``logps`` detached, TRL's ``num_iterations`` 1);
    ``ref_logps``: the reference model's (needed when ``config.beta`` > 0); ``entropies``: the
    per-token entropy of the policy (the ``entropy`` metric; None: not reported).
    ``reduce_segments``: sums a ``[k, num_sequences]`` tensor over the context-parallel group,
    with autograd (None: one rank holds whole completions); ``reporting``: this rank counts the
    completions (one rank of a context-parallel group).
    """
    loss_kind = LOSSES[config.loss_type]
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps = logps.to(dtype)
    old = logps.detach() if old_logps is None else old_logps.to(dtype)
    adv = advantages.to(dtype)
    weight = mask.to(dtype)
    index = torch.where(mask.bool(), seq_id, torch.zeros_like(seq_id)).long()
    reduce = reduce_segments or (lambda sums: sums)

    log_ratio = logps - old
    token_counts = _segment_sum(weight, index, num_sequences)
    if config.importance_sampling_level == "sequence":
        ratio_sums = _segment_sum(log_ratio * weight, index, num_sequences)
        token_counts, ratio_sums = reduce(torch.stack([token_counts, ratio_sums]))
        token_counts = token_counts.detach()
        log_weight = (ratio_sums / token_counts.clamp(min=1.0))[index]
    else:
        token_counts = reduce(token_counts[None])[0]
        log_weight = log_ratio
    coef = torch.exp(log_weight)
    per_token, indicators = loss_kind.surrogate(Terms(coef, adv, logps, config))
    kl = None
    if config.beta != 0.0:
        if ref_logps is None:
            raise ValueError("rl.beta > 0 needs the reference log-probs (ref_logps)")
        delta = ref_logps.to(dtype) - logps
        kl = torch.exp(delta) - delta - 1
        if config.use_bias_correction_kl:
            kl = kl * coef
        per_token = per_token + config.beta * kl

    inverse_count = (1.0 / token_counts.clamp(min=1.0))[index]
    if loss_kind.aggregation == "completion_mean":
        loss_sum = (per_token * weight * inverse_count).sum()
    elif loss_kind.aggregation == "max_length":
        loss_sum = (per_token * weight).sum() / config.max_completion_length
    else:
        loss_sum = (per_token * weight).sum()
    tokens = weight.sum().detach()
    completions = torch.tensor(float(num_sequences if reporting else 0), dtype=torch.float64,
                               device=logps.device)
    count = tokens.to(torch.float64) if loss_kind.unit == "tokens" else completions

    with torch.no_grad():
        sums = {"tokens": tokens.to(torch.float64), "completions": completions}
        if kl is not None:
            sums["kl"] = (kl * weight).sum().to(torch.float64)
        if entropies is not None:
            sums["entropy"] = (entropies.to(dtype) * weight).sum().to(torch.float64)
        # Token level: indicator means over tokens. Sequence level: one value per completion,
        # spread over its tokens so that the sums add up to the completions' values.
        per_completion = config.importance_sampling_level == "sequence"
        spread = weight * inverse_count if per_completion else weight
        for name, flags in indicators.items():
            sums[name] = (flags.to(dtype) * spread).sum().to(torch.float64)
        mins, maxs = {}, {}
        if loss_kind.min_max:
            flag_sums = reduce(torch.stack([
                _segment_sum(indicators[name].to(dtype) * weight, index, num_sequences)
                for name, _, _ in loss_kind.min_max]))
            # TRL: a fully masked completion is NaN (left out) at token level, 0 at sequence level
            counts = token_counts.clamp(min=1.0) if per_completion else token_counts
            for row, (_, metric, how) in zip(flag_sums, loss_kind.min_max):
                means = (row / counts).to(torch.float64)
                means = means[~torch.isnan(means)]
                if how == "min":
                    mins[metric] = means.min() if means.numel() else _EMPTY_MIN
                else:
                    maxs[metric] = means.max() if means.numel() else -_EMPTY_MIN
    return PolicyLossSums(loss_sum, count, sums, mins, maxs)


def metric_means(config: RLConfig, sums: dict[str, float], mins: dict[str, float],
                 maxs: dict[str, float]) -> dict[str, float]:
    """TRL's metric names and values from the step's all-reduced :class:`PolicyLossSums` fields:
    ``kl`` (beta > 0) and ``entropy`` (when entropies were given) as token means; for the clipped
    losses ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (token
    means, or completion means at ``importance_sampling_level: sequence``), ``clip_ratio/low_min``
    and ``clip_ratio/high_max`` (over completions); for cispo ``cispo_clip_ratio``."""
    per_completion = config.importance_sampling_level == "sequence"
    tokens = max(sums["tokens"], 1.0)
    indicator_count = max(sums["completions"], 1.0) if per_completion else tokens
    out = {}
    for name in ("kl", "entropy"):
        if name in sums:
            out[name] = sums[name] / tokens
    for name in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region"):
        if name in sums:
            out[f"{name}_mean"] = sums[name] / indicator_count
    if "cispo_clip_ratio" in sums:
        out["cispo_clip_ratio"] = sums["cispo_clip_ratio"] / indicator_count
    for name, value in {**mins, **maxs}.items():
        out[name] = value if abs(value) != float("inf") else float("nan")
    return out
