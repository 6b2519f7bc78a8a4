"""One step's rollouts on this data-parallel rank: prompts drawn, completions sampled by the
trainer's own model (:mod:`megasmol.decode`), rewards, advantages, and the step's metrics.

Every rank of a data-parallel replica (its tensor- and pipeline-parallel peers) takes part in
generation and gets the same completions. Rewards are computed per rank for its own groups; the
rewards of every replica are gathered over the data-parallel group, so advantages with
``rl.scale_rewards: batch`` and every metric are those of the whole step, the same on each rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from megasmol.rl.order import completion_seed, refill_prompts, step_prompts
from megasmol.rl.pack import PackedCompletion


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int
    group: int
    """The group (prompt draw) it belongs to, unique within the step on this rank."""
    prompt: list[int]
    completion: list[int]
    logps: list[float]
    truncated: bool
    entropies: list[float] = field(default_factory=list)
    """The entropy of the decoder's distribution at each completion token (the ``entropy`` metric)."""
    reward: float = 0.0
    per_reward: dict[str, float] = field(default_factory=dict)
    """Each named reward's value (before weighting), for ``rewards/NAME/mean``."""
    advantage: float = 0.0


@dataclass
class Rollout:
    """What one rollout round gives the step: its completions and its metrics."""

    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)

    def packed(self, mask_truncated: bool) -> list[PackedCompletion]:
        return [PackedCompletion(s.prompt, s.completion, s.logps, s.advantage,
                                 trained=not (mask_truncated and s.truncated), entropies=s.entropies)
                for s in self.samples]


@dataclass
class RolloutContext:
    """What rollouts need from the run, gathered once by the RL objective's set-up."""

    generate: Callable[..., list]
    """``(prompts, seeds) -> completions`` with the run's sampling settings and model."""
    prompt_sets: list
    """Each stage's prompt set (``data.prompts.store.read_prompts``), by stage index."""
    score: Callable[[list, list[list[int]], list[bool]], Any]
    """``(records, completion ids, truncated) -> RewardResult``."""
    rl: Any
    """The ``rl:`` section."""
    seed: int
    dp_rank: int = 0
    dp_size: int = 1
    say: Callable[[str], None] = print


def run_rollout(ctx: RolloutContext, step: int, stage: int, prompts_per_step: int) -> Rollout:
    """Draw, sample, score and compute advantages for ``step``; with dynamic sampling, groups with
    equal rewards are dropped and refills drawn until the step has ``prompts_per_step`` groups
    (over all ranks) or ``rl.max_refills`` rounds ran."""
    from megasmol.rl.advantages import group_advantages

    rl, prompts = ctx.rl, ctx.prompt_sets[stage]
    started = time.perf_counter()
    drawn = step_prompts(step, prompts_per_step, len(prompts), ctx.seed)
    kept, scored, rounds = [], [], 0
    wanted = prompts_per_step
    positions = list(enumerate(drawn))
    stream = 0
    generated_tokens, next_group, first_round = 0, 0, 0
    while True:
        mine = [(pos, index) for pos, index in positions if pos % ctx.dp_size == ctx.dp_rank]
        samples = _sample(ctx, prompts, step, stream, mine, next_group)
        next_group += len(mine)
        if stream == 0:
            first_round = next_group
        generated_tokens += sum(len(s.completion) for s in samples)
        _score(ctx, prompts, samples)
        scored.extend(samples)
        if not rl.dynamic_sampling:
            kept = scored
            break
        signal = [s for s in samples if not _flat_group(samples, s.group)]
        kept.extend(signal)
        have = _all_sum(len({s.group for s in kept}), ctx)
        if have >= wanted or rounds >= rl.max_refills:
            if have < wanted:
                ctx.say(f"step {step}: dynamic sampling found {have:.0f} of {wanted} groups with "
                        f"different rewards after {rounds} refills (rl.max_refills); training on those")
            if not have:  # nothing to learn from: the first round's groups, whose advantages are 0
                kept = [s for s in scored if s.group < first_round]
            break
        rounds += 1
        stream = rounds
        extra = refill_prompts(step, rounds, wanted - have, len(prompts), ctx.seed)
        positions = list(enumerate(extra))
    generation_s = time.perf_counter() - started
    kept_rewards = _gather_plain([s.reward for s in kept], ctx)
    if kept_rewards:
        advantages = group_advantages(torch.tensor(kept_rewards, dtype=torch.float32),
                                      rl.num_generations, rl.scale_rewards).advantages
        offset = _rank_offset(len(kept), ctx)
        for sample, advantage in zip(kept, advantages[offset:offset + len(kept)].tolist()):
            sample.advantage = advantage
    every = _gather_plain([(s.reward, len(s.completion), s.truncated, s.per_reward) for s in scored], ctx)
    metrics = _metrics(every, rl, generation_s, _all_sum(generated_tokens, ctx))
    if rl.dynamic_sampling:
        metrics["dynamic_sampling/rounds"] = float(rounds + 1)
    return Rollout(kept, metrics)


def _sample(ctx: RolloutContext, prompts: Any, step: int, stream: int, mine: list[tuple[int, int]],
            first_group: int) -> list[Sample]:
    rl = ctx.rl
    inputs, seeds, owners = [], [], []
    for group, (position, index) in enumerate(mine, start=first_group):
        record = prompts[index]
        for j in range(rl.num_generations):
            inputs.append(list(record.prompt_ids))
            seeds.append(completion_seed(ctx.seed, step, stream, position, j))
            owners.append((group, index))
    completions = ctx.generate(inputs, seeds) if inputs else []
    return [Sample(index, group, prompt, list(c.tokens), list(c.logprobs), c.finish_reason == "length",
                   list(c.entropies))
            for (group, index), prompt, c in zip(owners, inputs, completions)]


def _score(ctx: RolloutContext, prompts: Any, samples: list[Sample]) -> None:
    if not samples:
        return
    records = [prompts[s.prompt_index] for s in samples]
    result = ctx.score(records, [s.completion for s in samples], [s.truncated for s in samples])
    for sample, value in zip(samples, result.total):
        sample.reward = float(value)
    for sample, per in zip(samples, _per_sample(result.per_reward, len(samples))):
        sample.per_reward = per


def _per_sample(per_reward: dict[str, list[float]], n: int) -> list[dict[str, float]]:
    return [{name: float(values[i]) for name, values in per_reward.items()} for i in range(n)]


def _flat_group(samples: list[Sample], group: int) -> bool:
    rewards = [s.reward for s in samples if s.group == group]
    return max(rewards) - min(rewards) == 0


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def _all_sum(value: float, ctx: RolloutContext) -> float:
    if ctx.dp_size == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    from megasmol.runtime.distributed import current_device

    tensor = tensor.to(current_device())
    torch.distributed.all_reduce(tensor, group=_dp_group())
    return tensor.item()


def _rank_offset(count: int, ctx: RolloutContext) -> int:
    if ctx.dp_size == 1:
        return 0
    counts: list = [None] * ctx.dp_size
    torch.distributed.all_gather_object(counts, count, group=_dp_group())
    return sum(counts[:ctx.dp_rank])


def _metrics(every: list[tuple], rl, generation_s: float, tokens: float) -> dict[str, float]:
    """TRL's names: ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/NAME/*``,
    ``completions/*``; plus the generation time and rollout tokens per second."""
    from megasmol.rl.advantages import group_advantages, reward_function_metrics

    if not every:
        return {"time/generation_s": generation_s}
    rewards = torch.tensor([r for r, _, _, _ in every], dtype=torch.float32)
    lengths = torch.tensor([n for _, n, _, _ in every], dtype=torch.float64)
    clipped = torch.tensor([t for _, _, t, _ in every], dtype=torch.float64)
    names = sorted({name for _, _, _, per in every for name in per})
    per_function = {name: torch.tensor([per.get(name, math.nan) for _, _, _, per in every],
                                       dtype=torch.float64) for name in names}
    out = dict(group_advantages(rewards, rl.num_generations, rl.scale_rewards).metrics)
    out.update(reward_function_metrics(per_function))
    out.update({
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": clipped.mean().item(),
        "time/generation_s": generation_s,
        "rollout/tokens_per_s": tokens / generation_s if generation_s > 0 else 0.0,
    })
    return out


def _gather_plain(items: list, ctx: RolloutContext) -> list:
    """Every data-parallel rank's ``items``, in rank order."""
    if ctx.dp_size == 1:
        return items
    gathered: list = [None] * ctx.dp_size
    torch.distributed.all_gather_object(gathered, items, group=_dp_group())
    return [item for part in gathered for item in part]
