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

import torch
from torch import Tensor

from megasmol.data.masking import ModelInputs
from megasmol.runtime.distributed import current_device
from megasmol.train.objectives import TokenLoss


def _per_sequence_loss_func(inputs: ModelInputs, output_tensor: Tensor):
    """Each sequence's summed per-token loss under its mask (downstream evaluation)."""
    loss_mask = inputs.loss_mask
    sums = (output_tensor.float() * loss_mask.float()).sum(dim=-1)
    return sums.sum(), loss_mask.sum().to(torch.int), {"per_sequence": sums.detach()}


def _forward_step(data_iterator, model, loss_func=None, scored_only: bool = False):
    """One micro-batch's forward. ``scored_only`` (forward-only passes: validation, scoring,
    reference log-probs): the output layer runs only where the loss mask counts, which gives the
    same masked losses without the whole vocabulary at every position."""
    inputs: ModelInputs = next(data_iterator)
    extra = {"loss_positions": inputs.loss_mask > 0} if scored_only else {}
    output = model(inputs.tokens, inputs.position_ids, inputs.attention_mask,
                   labels=inputs.labels, packed_seq_params=inputs.packed_seq_params, **extra)
    return output, partial(loss_func or TokenLoss(), inputs)


def forward_only_outputs(model, micro_batches: list[ModelInputs], loss_func) -> list[dict]:
    """Forward only with ``loss_func``; on the last pipeline stage, what it reported for each
    micro-batch (an empty list on other stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    geometry = StepGeometry.of(micro_batches[0])
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_func=loss_func, scored_only=True),
        data_iterator=iter(micro_batches), model=[model], num_microbatches=len(micro_batches),
        seq_length=geometry.seq_length, micro_batch_size=geometry.micro_batch_size,
        forward_only=True)


def per_sequence_losses(model, micro_batches: list[ModelInputs]) -> list[Tensor]:
    """Forward only; on the last pipeline stage, each micro-batch's [b] summed losses (an empty
    list on other stages)."""
    outputs = forward_only_outputs(model, micro_batches, _per_sequence_loss_func)
    return [item["per_sequence"].to(torch.float64).cpu() for item in outputs]


@dataclass
class StepGeometry:
    """The activation shape pipeline stages exchange: [seq_length, micro_batch, hidden].

    ``seq_length`` is the whole sequence: Megatron's schedules divide it by the context-parallel
    size themselves, and ``inputs`` already hold only this rank's share.
    """

    seq_length: int
    micro_batch_size: int

    @classmethod
    def of(cls, inputs: ModelInputs) -> "StepGeometry":
        from megatron.core import parallel_state

        b, s = inputs.tokens.shape
        return cls(seq_length=s * parallel_state.get_context_parallel_world_size(), micro_batch_size=b)


def forward_backward(model, micro_batches: list[ModelInputs], *, forward_only: bool = False,
                     objective=None) -> Tensor:
    """Run every micro-batch; returns [loss_sum, count, *metric sums] on the last pipeline stage,
    zeros elsewhere (callers reduce it, see :func:`global_loss`)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    objective = objective or TokenLoss()
    geometry = StepGeometry.of(micro_batches[0])
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_func=objective, scored_only=forward_only),
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
                objective=None) -> StepTotals:
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
