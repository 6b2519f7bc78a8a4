"""``optim.distributed`` for Muon and AdEMAMix: Megatron-Core's ``LayerWiseDistributedOptimizer``.

Megatron-Core's distributed optimizer (ZeRO-1, what ``optim.distributed`` means for AdamW) cuts
the DDP gradient buffer into equal contiguous ranges, one per data-parallel rank, so a rank may own
half of one matrix and a slice of the next. That suits an element-wise update (Adam) and nothing
else: Muon orthogonalizes a whole matrix, and the buffer layout has no room for AdEMAMix's third
state. Megatron-Core refuses Muon with it.

Megatron-Core 0.16.1's ``LayerWiseDistributedOptimizer`` (``optimizer/layer_wise_optimizer.py``)
shards by parameter instead, and is used here as shipped:

* DDP all-reduces the gradients as without sharding (``use_distributed_optimizer`` off), so every
  rank has every reduced gradient;
* the parameters of all the chained optimizers (Muon's matrices and AdamW's rest, or AdEMAMix's
  single group) are sorted by size and dealt to the data-parallel ranks ping-pong; each rank's
  optimizers keep only the parameters it owns, so the states (and, in bf16, the fp32 master
  weights) of a parameter live on one data-parallel rank: memory for states falls by about the
  data-parallel size, as with ZeRO-1;
* the gradient norm is reduced over all ranks (each parameter counted once, by its owner), each
  rank steps its own parameters, and the updated weights are all-gathered over data parallelism.

Each rank sees whole parameters, so Muon orthogonalizes whole matrices (under TP it still
gathers the TP shards, see ``muon.py``: the ranks of one TP group own the same parameters, because
the deal depends only on shapes and order). The cost is an all-gather of the weights after the step
instead of ZeRO-1's reduce-scatter/all-gather of buckets, and a balance by parameter count only.

Two changes, both for fp32 runs (the CPU path) and gloo:

* Megatron-Core's layer-wise checkpoint code expects the bf16 wrapper's state layout (an
  ``optimizer`` entry); the fp32 wrapper's state is the torch optimizer's own. ``_Fp32Part``
  nests it under ``optimizer`` (and takes it out again on load). Its shared per-parameter
  ``step`` (AdamW's) is agreed over all ranks when saving: a rank that owns none of an
  optimizer's parameters has none, and the checkpoint's common part is rank 0's.
* Megatron-Core all-gathers the updated weights with one all-gather of unequal sizes
(each rank's flattened parameters), which NCCL accepts and gloo (CPU) refuses. ``_LayerWise``
pads every rank's flat buffer to the largest one, so one code path runs on both; the padding is
at most the size difference the size-sorted ping-pong deal leaves between ranks.

Checkpoints: each rank writes the states of the parameters it owns (the data-parallel replica id
is 0 for all of them); the state keys are the model's, so a checkpoint is read back under the same
layout (Megatron-Core supports only that: "fixed DP usage").
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def layer_wise(parts: list[tuple[torch.optim.Optimizer, Callable]], config):
    """``parts`` (torch optimizer, ``init_state_fn``) sharded by parameter over data parallelism.

    ``config``: Megatron-Core's ``OptimizerConfig`` (``use_distributed_optimizer`` off). The torch
    optimizers get Megatron's fp32 wrapper here; in bf16 the layer-wise optimizer wraps them
    itself after the deal, so that fp32 master weights exist only for owned parameters.
    """
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    class _LayerWise(LayerWiseDistributedOptimizer):
        @torch.no_grad()
        def allgather_params(self) -> None:
            for params_list, group in ((self.dp_cp_params_list, self.pg_collection.dp_cp),
                                       (self.expt_dp_params_list, self.pg_collection.expt_dp)):
                if params_list:
                    allgather_padded(params_list, group)

    class _Fp32Part(FP32Optimizer):
        def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
            state = super().sharded_state_dict(model_sharded_state_dict, is_loading, metadata)
            steps = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(steps, state["state"].get("common_step"))
            step = next((s for s in steps if s is not None), None)
            if step is not None:
                state["state"]["common_step"] = step
            return {"optimizer": state}

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict["optimizer"])

    wrapped = [_Fp32Part(optimizer, config, init_fn) for optimizer, init_fn in parts]
    groups = ProcessGroupCollection.use_mpu_process_groups(["dp_cp", "expt_dp"])
    return _LayerWise(wrapped, config, groups, init_state_fn_list=[fn for _, fn in parts])


def allgather_padded(params_list: list[list[torch.Tensor]], group) -> None:
    """Copy every rank's updated parameters (``params_list[rank]``) into every other rank's model,
    through one all-gather of equal-sized (padded) flat buffers."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    rank = torch.distributed.get_rank(group)
    sample = next(p for params in params_list for p in params)
    sizes = [sum(p.numel() for p in params) for params in params_list]
    width = max(sizes)
    local = torch.zeros(width, device=sample.device, dtype=sample.dtype)
    if params_list[rank]:
        local[:sizes[rank]] = _flatten_dense_tensors(params_list[rank])
    gathered = [torch.empty_like(local) for _ in params_list]
    torch.distributed.all_gather(gathered, local, group=group)
    for index, (flat, params) in enumerate(zip(gathered, params_list)):
        if index == rank or not params:
            continue
        for updated, param in zip(_unflatten_dense_tensors(flat[:sizes[index]], params), params):
            param.data.copy_(updated)

