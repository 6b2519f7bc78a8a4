"""Reinforcement learning with verifiable rewards (the GRPO family): ``training.objective: rl``.

The data recipe's datasets are prompt sets (``megasmol prepare-prompts``). Each step's batch is
made by :class:`megasmol.rl.batches.RolloutBatches`: the run's own model samples
``rl.num_generations`` completions per prompt (:mod:`megasmol.decode`, no second model, no weight
copy), the rewards (``rewards:``) score them, group advantages are computed, and the completions
are packed as documents. :class:`PolicyLoss` turns the per-token output (the cross-entropy of
``logits / rl.temperature``, plain: no z-loss) into the policy loss of ``rl.loss_type``
(:mod:`megasmol.rl.policy_loss`) and checks that the run is exactly on-policy: in a rollout
batch's first update, the trainer's log-probs of the sampled tokens must equal the decoder's
(``logps/rollout_max_diff``, and NeMo-RL's ``token_mult_prob_error``: the mean of
``exp(|rollout - trainer|)`` over the trained completion tokens, :mod:`megasmol.rl.logp_agreement`;
later updates of the batch would compare the same rollout log-probs with the same old ones, so
the first update's value is the batch's). The
``entropy`` metric (TRL's: the policy's mean per-token entropy over the trained completion tokens)
comes from the decoder's logits, which are the trainer's in that first update; later updates of a
rollout batch (``rl.num_iterations`` > 1) do not report it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from megasmol.config.typed import ConfigError
from megasmol.rl.logp_agreement import TOKEN_MULT_PROB_ERROR, mult_prob_error_sum
from megasmol.train.objectives.base import LossReport

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.data.masking import ModelInputs
    from megasmol.data.recipe import DataRecipe, StagePlan
    from megasmol.model.spec import ModelSpec
    from megasmol.rl.batches import RolloutBatches
    from megasmol.train.setup import TrainingSetup

ON_POLICY = "logps/rollout_max_diff"
"""The largest |trainer - decoder| log-prob of a sampled token in a rollout batch's first update."""


class PolicyLoss:
    """The ``rl.loss_type`` loss of a micro-batch of packed completions, with TRL's metrics."""

    def __init__(self, rl: Any):
        from megasmol.rl.policy_loss import LOSSES
        from megasmol.train.rollout_engines import rollout_engine

        self.rl = rl
        self.unit = LOSSES[rl.loss_type].unit
        self.engine_entropy = rollout_engine(rl.engine).reports_entropy
        """Whether the rollouts carry the policy's entropies (else no ``entropy`` is reported)."""
        # The loss reads completion tokens only: the output layer runs there alone (a prompt's
        # positions are most of a packed row, and a [tokens, vocabulary] GEMM most of the step).
        self.scored_only = True
        probe = self._loss(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
                           1, None, torch.zeros(1) if rl.beta > 0 else None, torch.zeros(1))
        self.metric_names: tuple[str, ...] = tuple(probe.sums)
        """The summed metrics this configuration reports (``tokens``, ``completions``, ``kl``...)."""
        self.rollout_metrics: dict[str, float] = {}
        self._extremes = {how: [metric for _, metric, kind in LOSSES[rl.loss_type].min_max if kind == how]
                          for how in ("min", "max")}
        self._mins, self._maxs = self._fresh_extremes()
        self._mult_prob = [0.0, 0.0]  # NeMo-RL's token_mult_prob_error as (sum, tokens)

    def _fresh_extremes(self) -> tuple[dict[str, float], dict[str, float]]:
        """Every rank reduces the same names (inf / -inf where it saw none)."""
        return ({name: float("inf") for name in self._extremes["min"]},
                {ON_POLICY: 0.0, **{name: float("-inf") for name in self._extremes["max"]}})

    def _loss(self, logps, advantages, mask, seq_id, n, old, ref, entropies, cp_group=None):
        from megasmol.rl.policy_loss import policy_loss

        reduce, reporting = None, True
        if cp_group is not None:  # each context-parallel rank holds a share of each completion
            from torch.distributed.nn.functional import all_reduce

            def reduce(sums):
                return all_reduce(sums, group=cp_group)

            reporting = torch.distributed.get_rank(cp_group) == 0
        return policy_loss(self.rl, logps, advantages, mask, seq_id, n, old_logps=old, ref_logps=ref,
                           entropies=entropies, reduce_segments=reduce, reporting=reporting)

    def token_weights(self, inputs: ModelInputs) -> None:
        """None: the policy loss is not linear in the per-token log-probs."""
        return None

    def set_rollout(self, metrics: dict[str, float]) -> None:
        """The metrics of the rollout batch the next step trains on (the same on every rank)."""
        self.rollout_metrics = metrics

    def __call__(self, inputs: ModelInputs, output_tensor: Tensor) -> LossReport:
        if inputs.advantages is None or inputs.segments is None:
            raise TypeError("the RL objective got micro-batches that are not packed completions")
        logps = -output_tensor.reshape(-1).float()
        segments = inputs.segments.reshape(-1)
        seq_id, count, cp_group = _completion_ids(segments)
        mask = inputs.loss_mask.reshape(-1).float() * (segments >= 0)
        old = inputs.old_logps.reshape(-1) if inputs.old_logps is not None else None
        ref = inputs.ref_token_logps.reshape(-1) if inputs.ref_token_logps is not None else None
        # The decoder's entropies are the trainer's in a rollout batch's first update (the same
        # weights, the same logits to float rounding: the on-policy check); later updates report
        # none (zeros here, left out by ``means``).
        entropies = (inputs.rollout_entropies.reshape(-1) if inputs.rollout_entropies is not None
                     else torch.zeros_like(logps))
        if inputs.rollout_logps is not None and bool((mask > 0).any()):
            diff = (logps.detach().double() - inputs.rollout_logps.reshape(-1))[mask > 0].abs().max()
            self._maxs[ON_POLICY] = max(self._maxs[ON_POLICY], float(diff))
            total, tokens = mult_prob_error_sum(inputs.rollout_logps.reshape(-1), logps.detach(), mask)
            self._mult_prob[0] += total
            self._mult_prob[1] += tokens
        if not count:  # padding only (a rank whose groups were all dropped)
            zero = logps.sum() * 0.0
            report = torch.zeros(2, dtype=torch.float64)
            metrics = torch.zeros(len(self.metric_names), dtype=torch.float64)
            return zero, torch.tensor(0, dtype=torch.int), {"loss": report, "metrics": metrics}
        result = self._loss(logps, inputs.advantages.reshape(-1), mask, seq_id, count, old, ref, entropies,
                            cp_group)
        for name, value in result.mins.items():
            self._mins[name] = min(self._mins[name], float(value))
        for name, value in result.maxs.items():
            self._maxs[name] = max(self._maxs[name], float(value))
        metrics = torch.stack([result.sums[name] for name in self.metric_names])
        report = torch.stack([result.loss_sum.detach().double(), result.count.double()])
        return result.loss_sum, result.count.to(torch.int), {"loss": report, "metrics": metrics}

    def means(self, sums: list[float], count: float) -> dict[str, float]:
        """Collective (every rank calls it after the step's all-reduce): the policy metrics, the
        rollout's, and the minima and maxima over every rank (the on-policy check's included)."""
        from megasmol.rl.policy_loss import metric_means

        mins = self._reduce(self._mins, torch.distributed.ReduceOp.MIN)
        maxs = self._reduce(self._maxs, torch.distributed.ReduceOp.MAX)
        # Summed over every rank: tensor-parallel peers hold the same tokens and add them to
        # both the sum and the count, so the mean is the data-parallel union's.
        mult = self._reduce({"sum": self._mult_prob[0], "tokens": self._mult_prob[1]},
                            torch.distributed.ReduceOp.SUM)
        self._mins, self._maxs = self._fresh_extremes()
        self._mult_prob = [0.0, 0.0]
        on_policy = maxs.pop(ON_POLICY)
        out = metric_means(self.rl, dict(zip(self.metric_names, sums)), mins, maxs)
        out.update(self.rollout_metrics)
        if not self.engine_entropy:
            out.pop("entropy", None)
        if "time/generation_s" in self.rollout_metrics:  # a rollout batch's first update
            out[ON_POLICY] = on_policy
            if mult["tokens"] > 0:
                out[TOKEN_MULT_PROB_ERROR] = mult["sum"] / mult["tokens"]
        else:
            out.pop("entropy", None)
        return out

    @staticmethod
    def _reduce(values: dict[str, float], op) -> dict[str, float]:
        from megasmol.runtime.distributed import current_device

        if not values:
            return {}
        names = sorted(values)
        packed = torch.tensor([values[n] for n in names], dtype=torch.float64, device=current_device())
        torch.distributed.all_reduce(packed, op=op)
        return dict(zip(names, packed.tolist()))


def _completion_ids(segments: Tensor) -> tuple[Tensor, int, Any]:
    """Each token's completion index in ``[0, count)`` (0 where it belongs to none), the
    micro-batch's number of completions, and the context-parallel group (None without CP). Under
    CP each rank holds a share of the micro-batch: the completions are numbered over the union of
    the group's shares, so that every rank gives a completion the same index."""
    from megatron.core import parallel_state

    group = None
    present_ids = segments[segments >= 0]
    size = int(present_ids.max()) + 1 if present_ids.numel() else 0
    if parallel_state.get_context_parallel_world_size() > 1:
        group = parallel_state.get_context_parallel_group()
        size_t = torch.tensor([size], device=segments.device)
        torch.distributed.all_reduce(size_t, op=torch.distributed.ReduceOp.MAX, group=group)
        size = int(size_t.item())
    present = torch.zeros(size, dtype=torch.long, device=segments.device)
    present[present_ids] = 1
    if group is not None:
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.MAX, group=group)
    index = torch.cumsum(present, 0) - 1  # completion id -> its place among those present
    seq_id = index[segments.clamp(min=0)] if size else torch.zeros_like(segments)
    return seq_id.clamp(min=0), int(present.sum()), group


class ReinforcementLearning:
    """Prompt sets (``prepare-prompts``), completions sampled by the model being trained."""

    name = "rl"
    data = "prompt sets (`megasmol prepare-prompts` output)"

    def takes(self, prefix: Path) -> bool:
        from megasmol.data.prompts.store import is_prompt_set

        return is_prompt_set(prefix)

    def check(self, config: RunConfig, needed: bool) -> None:
        from megasmol.train.rollout_engines import rollout_engine

        rl = config.rl
        rollout_engine(rl.engine).check(config)
        if config.parallel.context_parallel > 1 and (rl.num_iterations > 1 or rl.beta > 0):
            raise ConfigError(f"rl.{'num_iterations > 1' if rl.num_iterations > 1 else 'beta > 0'} does "
                              "not run under parallel.context_parallel > 1 yet (the old and reference "
                              "log-prob passes keep whole rows; use data or tensor parallelism)")
        batch = config.training.global_batch_size
        if batch % rl.num_generations:
            raise ConfigError(f"training.global_batch_size ({batch}) counts completions per step and "
                              f"must be a multiple of rl.num_generations ({rl.num_generations})")
        if config.training.batch_rampup:
            raise ConfigError("training.batch_rampup is not supported with training.objective=rl")
        if rl.beta > 0 and needed and config.checkpoint.init_from is None:
            raise ConfigError("rl.beta > 0 needs a reference model: set checkpoint.init_from (the "
                              "policy's starting checkpoint, also the reference)")

    def batches(self, config: RunConfig, recipe: DataRecipe, plans: list[StagePlan], spec: ModelSpec,
                dp_rank: int, dp: int) -> RolloutBatches:
        from megasmol.rl.batches import RolloutBatches

        for plan in plans:
            if len(plan.stage.datasets) != 1:
                raise ConfigError(f"data recipe {recipe.name}: stage {plan.stage.name} lists "
                                  f"{len(plan.stage.datasets)} datasets; an RL stage reads one prompt set")
        return RolloutBatches(plans, config.training.micro_batch_size, dp_rank, dp,
                              config.rl.num_iterations, config.rewards.mask_truncated_completions,
                              spec.eos_token_id, config.path(config.run_dir) / "rollouts")

    def build(self, setup: TrainingSetup, *, resuming: bool, needed: bool) -> PolicyLoss:
        from megasmol.model.gpt import plain_cross_entropy, sampling_temperature
        from megasmol.rl.batches import RolloutBatches
        from megasmol.train.objectives.rollout_setup import rollout_context

        config = setup.config
        setup.hold(plain_cross_entropy(setup.model))
        setup.hold(sampling_temperature(setup.model, config.rl.temperature))
        loss = PolicyLoss(config.rl)
        batches = setup.batches
        assert isinstance(batches, RolloutBatches)
        batches.context = rollout_context(setup)
        batches.on_rollout = loss.set_rollout
        batches.old_logps = old_logps_pass(setup, needed)
        return loss


def old_logps_pass(setup: TrainingSetup, needed: bool):
    """The forward-only pass that attaches ``old_logps`` (``rl.num_iterations`` > 1) and the
    reference model's ``ref_token_logps`` (``rl.beta`` > 0) to a rollout batch's micro-batches,
    in the packing it trains in; None when neither is needed."""
    from megasmol.train.objectives.rollout_setup import attach_token_logps, reference_model

    rl = setup.config.rl
    reference = reference_model(setup) if rl.beta > 0 and needed else None
    if rl.num_iterations == 1 and reference is None:
        return None

    def attach(micro: list[dict]) -> None:
        if rl.num_iterations > 1:
            attach_token_logps(setup, setup.ddp_model, micro, "old_logps")
        if reference is not None:
            attach_token_logps(setup, reference, micro, "ref_token_logps")

    return attach
