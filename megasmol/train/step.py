"""One optimizer step's forward/backward through Megatron-Core's pipeline schedules.

The objective (:mod:`objectives`) turns each micro-batch's output into a loss. For next-token
training the loss is the token-weighted mean over the whole global batch: each micro-batch returns its
summed per-token loss (cross-entropy, plus the z-loss term when the spec asks for it) under the
document-masking loss mask and its token count; with ``calculate_per_token_loss`` Megatron-Core
divides the gradients by the global token count in ``finalize_model_grads``. The result does not
depend on how the batch is split over micro-batches, data-parallel or pipeline ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from megasmol.data.masking import ModelInputs
from megasmol.runtime.distributed import current_device
from megasmol.runtime.pipeline import StepGeometry, forward_step
from megasmol.train.objectives import Objective, TokenLoss
from megasmol.utils.faults import FaultPlan

if TYPE_CHECKING:
    from megasmol.train.guard import GuardDecision, StepGuard
    from megasmol.train.setup import TrainingSetup


def forward_backward(model: torch.nn.Module, micro_batches: list[ModelInputs], *,
                     forward_only: bool = False, objective: Optional[Objective] = None) -> Tensor:
    """Run every micro-batch; returns [loss_sum, count, *metric sums] on the last pipeline stage,
    zeros elsewhere (callers reduce it, see :func:`global_loss`)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    objective = objective or TokenLoss()
    geometry = StepGeometry.of(micro_batches[0])
    outputs = get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss_func=objective,
                                  scored_only=forward_only or objective.scored_only,
                                  token_weights=None if forward_only else objective.token_weights),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=geometry.seq_length,
        micro_batch_size=geometry.micro_batch_size,
        forward_only=forward_only,
    )
    totals = torch.zeros(2 + len(objective.metric_names), dtype=torch.float64)
    for item in outputs:
        totals[:2] += item["loss"].to(torch.float64).cpu()
        if "metrics" in item:
            totals[2:] += item["metrics"].to(torch.float64).cpu()
    return totals


@dataclass
class StepTotals:
    """What every rank learns from a step's one all-reduce."""

    loss: float
    """Mean loss over the global batch (NaN when it has no tokens)."""
    tokens: int
    """Loss tokens in the global batch (preference pairs for a preference objective)."""
    stop: bool = False
    """Some rank was asked to stop (a signal): every rank saves and stops after this step."""
    nonfinite_grads: bool = False
    """Some rank holds a non-finite gradient: nobody applies this step's update."""
    metrics: dict = field(default_factory=dict)
    """The objective's metrics, averaged over the global batch (e.g. ``rewards/accuracies``)."""


def global_loss(local: Tensor, stop: bool = False, nonfinite_grads: bool = False,
                objective: Optional[Objective] = None) -> StepTotals:
    """One all-reduce over the world for the loss, the metrics and the flags every rank must
    agree on.

    The last pipeline stage's sums are counted once per tensor-parallel rank, which cancels in
    the ratios; the flag slots are raised by whichever rank saw a signal or a non-finite
    gradient, so every rank decides the same thing from the same collective.
    """
    packed = torch.zeros(2 + len(local), dtype=torch.float64)
    packed[:2] = local[:2]
    packed[2], packed[3] = float(stop), float(nonfinite_grads)
    packed[4:] = local[2:]
    packed = packed.to(current_device())
    torch.distributed.all_reduce(packed)
    values = packed.tolist()
    loss_sum, tokens, raised, nonfinite = values[:4]
    mean = loss_sum / tokens if tokens > 0 else float("nan")
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    metrics = objective.means(values[4:], tokens) if objective is not None else {}
    return StepTotals(mean, int(round(tokens / tp)), raised > 0, nonfinite > 0, metrics)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is raised on any rank (a collective; for steps that run no other)."""
    packed = torch.tensor([float(flag)], dtype=torch.float64, device=current_device())
    torch.distributed.all_reduce(packed)
    return packed.item() > 0


def skip_step(setup: TrainingSetup, step: int, *, stop: bool = False) -> bool:
    """A step whose data is skipped (``spikes.skip_batches`` or a rollback's range): no forward,
    only the all-reduce that agrees on a stop request. Returns whether any rank asked to stop."""
    agreed = any_rank(stop)
    setup.faults.after_reduce(step)
    return agreed


def step_inputs(setup: TrainingSetup, micro: list[dict]) -> list[ModelInputs]:
    """A step's micro-batches as model inputs on this rank's device, as the run's config asks
    (document masks, restarted positions): for training, validation and the pre-flight alike."""
    from megasmol.data.masking import device_inputs

    data = setup.config.data
    return device_inputs(micro, setup.spec.eos_token_id, data.document_masking, setup.mask_format,
                         data.reset_position_ids)


@dataclass
class StepOutcome:
    totals: StepTotals
    """The step's all-reduced loss, tokens, flags and objective metrics."""
    decision: Optional[GuardDecision] = None
    """The guard's ``GuardDecision`` (None without a guard: the update is always applied)."""
    grad_norm: float | None = None
    """The clipped update's gradient norm; None when no update was applied."""

    @property
    def applied(self) -> bool:
        return self.grad_norm is not None


def train_step(setup: TrainingSetup, step: int, micro: list[dict], lr: float, *, stop: bool = False,
               guard: Optional[StepGuard] = None, faults: Optional[FaultPlan] = None) -> StepOutcome:
    """The one training step (the loop's and the pre-flight's): set the LR, forward and backward
    every micro-batch, one all-reduce for the loss, the stop request and the non-finite-gradient
    flag, the guard's decision, then the optimizer step when the decision is ``apply``.

    On ``rollback`` or ``diverged`` nothing is applied and the caller acts. ``faults``: a
    test's ``utils.faults.FaultPlan`` (default: the setup's, ``NO_FAULTS`` in production).
    """
    from megasmol.train.optimizer import apply_learning_rate, local_gradients_finite

    faults = faults or setup.faults
    apply_learning_rate(setup.optimizer, lr, setup.config.optim.weight_decay)
    inputs = step_inputs(setup, faults.batch(step, micro, setup.spec.vocab_size))
    setup.ddp_model.zero_grad_buffer()
    setup.optimizer.zero_grad()
    faults.before_forward(step)
    local = forward_backward(setup.ddp_model, inputs, objective=setup.objective)
    faults.after_backward(step, setup.ddp_model)
    totals = global_loss(local, stop=stop, nonfinite_grads=not local_gradients_finite(setup.ddp_model),
                         objective=setup.objective)
    faults.after_reduce(step)
    decision = guard.decide(step, totals.loss, totals.nonfinite_grads) if guard is not None else None
    if decision is not None and decision.action != "apply":
        return StepOutcome(totals, decision)
    success, grad_norm, _ = setup.optimizer.step()
    applied = success and grad_norm is not None
    return StepOutcome(totals, decision, float(grad_norm) if applied else None)
