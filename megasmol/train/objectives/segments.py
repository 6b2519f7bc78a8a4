"""Per-document sums over packed preference pairs: what the preference loss and the reference
pass (``train/reference.py``) both read from a micro-batch's per-token output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megasmol.train.objectives.base import LossReport

if TYPE_CHECKING:
    from megasmol.data.masking import ModelInputs


def segment_sums(inputs: ModelInputs, output_tensor: Tensor, with_grad: bool = True) -> Tensor:
    """[3, slots] per document of the micro-batch: policy log-prob, reference log-prob and label
    count, summed over its completion tokens and over the context-parallel group (the policy
    row with autograd, so each rank's tokens get the gradient of the whole document)."""
    from megatron.core import parallel_state

    if inputs.segments is None or inputs.ref_logps is None:
        raise TypeError("a preference objective got micro-batches that are not preference pairs")
    cp = parallel_state.get_context_parallel_world_size()
    segments = inputs.segments.reshape(-1)
    mask = inputs.loss_mask.reshape(-1).to(torch.float64) * (segments >= 0)
    index = segments.clamp(min=0)
    slots = segments.numel() * cp  # ids are below the micro-batch's whole [b * s] length
    slots += slots % 2  # chosen and rejected slots side by side
    logp = -output_tensor.reshape(-1).to(torch.float64) * mask
    policy = torch.zeros(slots, dtype=torch.float64, device=logp.device).index_add(0, index, logp)
    with torch.no_grad():
        ref = torch.zeros_like(policy).index_add(0, index, inputs.ref_logps.reshape(-1) * mask)
        count = torch.zeros_like(policy).index_add(0, index, mask)
    sums = torch.stack([policy if with_grad else policy.detach(), ref, count])
    if cp > 1:
        from torch.distributed.nn.functional import all_reduce

        sums = all_reduce(sums, group=parallel_state.get_context_parallel_group())
    return sums


def document_logps(inputs: ModelInputs, output_tensor: Tensor) -> LossReport:
    """Forward-only loss function: each document's summed completion log-prob (the reference
    pass); reported by context-parallel rank 0 only."""
    from megatron.core import parallel_state

    sums = segment_sums(inputs, output_tensor, with_grad=False)
    if parallel_state.get_context_parallel_rank() != 0:
        sums = torch.zeros_like(sums)
    zero = sums.new_zeros(())
    return zero, torch.tensor(0, dtype=torch.int), {"logps": sums[0], "count": sums[2]}
