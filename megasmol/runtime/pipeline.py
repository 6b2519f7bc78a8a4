"""Megatron-Core's pipeline schedules with megasmol's model inputs: one micro-batch's forward
(``forward_step``), forward-only passes that return what a loss function reported per micro-batch
(validation, downstream scoring, reference log-probs, greedy generation's geometry), for every
TP / PP / CP / DP layout. The training step (``train/step.py``) and evaluation (``eval/``) share it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from megasmol.data.masking import ModelInputs


def per_sequence_loss_func(inputs: ModelInputs, output_tensor: Tensor):
    """Each sequence's summed per-token loss under its mask (downstream evaluation)."""
    loss_mask = inputs.loss_mask
    sums = (output_tensor.float() * loss_mask.float()).sum(dim=-1)
    return sums.sum(), loss_mask.sum().to(torch.int), {"per_sequence": sums.detach()}


def forward_step(data_iterator, model, loss_func, scored_only: bool = False,
                 token_weights: Optional[Callable[[ModelInputs], Optional[Tensor]]] = None):
    """One micro-batch's forward. ``scored_only`` (forward-only passes: validation, scoring,
    reference log-probs): the output layer runs only where the loss mask counts, which gives the
    same masked losses without the whole vocabulary at every position. ``token_weights``
    (training: the objective's): the weights of its loss in the per-token output, given to the
    model (``SmolGPTModel.forward``'s ``loss_weights``) when the objective has them."""
    inputs = next(data_iterator)
    extra: dict[str, Tensor] = {"loss_positions": inputs.loss_mask > 0} if scored_only else {}
    weights = token_weights(inputs) if token_weights is not None else None
    if weights is not None:
        extra["loss_weights"] = weights
    output = model(inputs.tokens, inputs.position_ids, inputs.attention_mask,
                   labels=inputs.labels, packed_seq_params=inputs.packed_seq_params, **extra)
    return output, partial(loss_func, inputs)


def forward_only_outputs(model, micro_batches: list[ModelInputs], loss_func,
                         scored_only: bool = True) -> list[dict]:
    """Forward only with ``loss_func``; on the last pipeline stage, what it reported for each
    micro-batch (an empty list on other stages). ``scored_only``: the output layer runs where the
    loss mask counts only (False: everywhere); a pass that must round exactly as a training step
    does takes its objective's choice (same GEMM shapes, same rounding)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    geometry = StepGeometry.of(micro_batches[0])
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss_func=loss_func, scored_only=scored_only),
        data_iterator=iter(micro_batches), model=[model], num_microbatches=len(micro_batches),
        seq_length=geometry.seq_length, micro_batch_size=geometry.micro_batch_size,
        forward_only=True)


def per_sequence_losses(model, micro_batches: list[ModelInputs]) -> list[Tensor]:
    """Forward only; on the last pipeline stage, each micro-batch's [b] summed losses (an empty
    list on other stages)."""
    outputs = forward_only_outputs(model, micro_batches, per_sequence_loss_func)
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
    def of(cls, inputs: ModelInputs) -> StepGeometry:
        from megatron.core import parallel_state

        b, s = inputs.tokens.shape
        return cls(seq_length=s * parallel_state.get_context_parallel_world_size(), micro_batch_size=b)
