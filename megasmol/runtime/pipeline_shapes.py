"""What every rank of a pipeline-parallel job must agree on before a forward pass: the number
of rounds (the largest over the ranks) and the padded sequence length."""

from __future__ import annotations

import torch

from megasmol.runtime.distributed import current_device


def all_max(value: int) -> int:
    local = torch.tensor([value], dtype=torch.long, device=current_device())
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    return int(local.item())


def padded_length(length: int, model_chunk) -> int:
    """Sequence length a forward pass accepts: a multiple of 2 x CP (Megatron-Core's load-balanced
    split) and of TP under sequence parallelism."""
    from megatron.core import parallel_state as ps

    multiple = 1
    if ps.get_context_parallel_world_size() > 1:
        multiple *= 2 * ps.get_context_parallel_world_size()
    if getattr(model_chunk.config, "sequence_parallel", False):
        multiple *= ps.get_tensor_model_parallel_world_size()
    return -(-length // multiple) * multiple
