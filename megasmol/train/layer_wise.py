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
  single group) are dealt whole to the data-parallel ranks (:func:`deal`, below); each rank's
  optimizers keep only the parameters it owns, so the states (and, in bf16, the fp32 master
  weights) of a parameter live on one data-parallel rank: memory for states falls by about the
  data-parallel size, as with ZeRO-1;
* the gradient norm is reduced over all ranks (each parameter counted once, by its owner), each
  rank steps its own parameters, and the updated weights are all-gathered over data parallelism.

Each rank sees whole parameters, so Muon orthogonalizes whole matrices (under TP it still
gathers the TP shards, see ``muon.py``: the ranks of one TP group own the same parameters, because
the deal depends only on shapes and order). The cost is an all-gather of the weights after the step
instead of ZeRO-1's reduce-scatter/all-gather of buckets, and a balance by whole parameters only.

The deal is megasmol's (``_LayerWise.shard_params``). Megatron-Core sorts the parameters by size
and deals them ping-pong (0, 1, 1, 0, ...), which can give one rank both vocabulary matrices of a
small model, and counts elements only, although a Muon matrix keeps one state per element and an
AdamW or AdEMAMix parameter two or three. megasmol weighs each parameter by the fp32 values its
owner keeps for it (elements x (its optimizer's state tensors + 1 master copy in bf16)) and gives
the largest first to the least-loaded rank (greedy bin-packing, ties to the earlier parameter and
the lower rank): every rank computes the same deal from shapes and order alone, so the same model
and layout deal the same way on resume, and the loads of any two ranks differ by at most one
parameter's weight. A checkpoint does not depend on the deal (each state is stored under its
parameter's key, whoever owned it), so one written with another deal loads too.

Two changes, both for fp32 runs (the CPU path) and gloo:

* Megatron-Core's layer-wise checkpoint code expects the bf16 wrapper's state layout (an
  ``optimizer`` entry); the fp32 wrapper's state is the torch optimizer's own. ``_Fp32Part``
  nests it under ``optimizer`` (and takes it out again on load). Its shared per-parameter
  ``step`` (AdamW's) is agreed over all ranks when saving: a rank that owns none of an
  optimizer's parameters has none, and the checkpoint's common part is rank 0's.
* Megatron-Core all-gathers the updated weights with one all-gather of unequal sizes
(each rank's flattened parameters), which NCCL accepts and gloo (CPU) refuses. ``_LayerWise``
pads every rank's flat buffer to the largest one, so one code path runs on both; the padding is
what the deal leaves between the ranks' sizes (at most about one parameter).

Checkpoints: each rank writes the states of the parameters it owns (the data-parallel replica id
is 0 for all of them); the state keys are the model's, so a checkpoint is read back under the same
layout (Megatron-Core supports only that: "fixed DP usage").

The parameter groups must be the same on every rank, pipeline stages included: Megatron-Core's
``sharded_state_dict`` walks each chained optimizer's groups with one ``all_gather_object`` per
group over all ranks and writes, for every rank, the settings (learning rate, weight decay,
betas, ...) of the first rank whose group holds parameters, so a stage whose groups differed
would save and load another stage's settings (or, with another number of groups, the ranks'
collectives would not pair up). They are the same by construction where the groups come from
Megatron-Core's ``_get_param_groups`` (what ``trainable_param_groups`` and
``get_megatron_optimizer`` use): it all-gathers the group keys and gives every rank every group,
empty where it holds none, in one sorted order. :func:`require_same_groups` checks it when the
optimizer is built (the chain's parts, their optimizers' types and every group's settings) and
refuses, in one line, a layout where they differ, rather than letting a checkpoint mix them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megasmol.config.typed import ConfigError


@dataclass(frozen=True)
class Part:
    """One torch optimizer of the chain the layer-wise optimizer shards."""

    optimizer: torch.optim.Optimizer
    """The torch optimizer, over all of its parameters (the deal removes the ones other ranks own)."""
    init_state: Callable
    """``init_state(optimizer, config)``: every parameter's (zero) states, before a checkpoint load."""
    state_tensors: int
    """Parameter-sized state tensors it keeps per parameter (AdamW 2, Muon 1, AdEMAMix 3): what a
    parameter weighs in the deal."""


def deal(weights: Sequence[int], ranks: int) -> list[int]:
    """The owner (0 .. ``ranks - 1``) of each item: heaviest first (ties: the earlier item) to the
    least-loaded rank (ties: the lower rank). Deterministic; any two ranks' loads differ by at most
    the heaviest item."""
    owners = [0] * len(weights)
    loads = [(0, rank) for rank in range(ranks)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + weights[index], rank))
    return owners


def group_settings(parts: Sequence[Part]) -> list[tuple[str, list[str]]]:
    """What Megatron-Core's layer-wise checkpoint takes from one rank for all: for each part of
    the chain, its optimizer's type and each parameter group's settings (all but ``params``)."""
    return [(type(part.optimizer).__name__,
             [repr(sorted((key, value) for key, value in group.items() if key != "params"))
              for group in part.optimizer.param_groups])
            for part in parts]


def require_same_groups(settings_by_rank: Sequence[tuple[str, list]]) -> None:
    """``settings_by_rank``: ``(rank's name, group_settings(its parts))`` for every rank. A
    ``ConfigError`` naming the first rank whose chain or groups differ from the first rank's."""
    first_name, first = settings_by_rank[0]
    for name, settings in settings_by_rank[1:]:
        if settings == first:
            continue
        if len(settings) != len(first) or [t for t, _ in settings] != [t for t, _ in first]:
            difference = (f"optimizers {[t for t, _ in first]} on {first_name}, "
                          f"{[t for t, _ in settings]} on {name}")
        else:
            part, (kind, groups) = next((i, pair) for i, pair in enumerate(settings) if pair != first[i])
            theirs = first[part][1]
            if len(groups) != len(theirs):
                difference = (f"{kind} has {len(theirs)} parameter groups on {first_name}, "
                              f"{len(groups)} on {name}")
            else:
                index = next(i for i, (a, b) in enumerate(zip(theirs, groups)) if a != b)
                difference = (f"{kind}'s parameter group {index} is {theirs[index]} on {first_name}, "
                              f"{groups[index]} on {name}")
        raise ConfigError(
            f"optim.distributed: the optimizer's parameter groups differ between ranks ({difference}); "
            "Megatron-Core's layer-wise checkpoint takes each group's settings from the first rank that "
            "holds parameters in it, so it would save one rank's settings for another: set "
            "optim.distributed: false for this model and layout")


def _check_same_groups(parts: Sequence[Part]) -> None:
    """:func:`require_same_groups` over all ranks (the ranks Megatron-Core's checkpoint code
    gathers the groups over), each named by its global rank and pipeline stage."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    name = (f"rank {torch.distributed.get_rank()} (pipeline stage "
            f"{parallel_state.get_pipeline_model_parallel_rank()})")
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (name, group_settings(parts)))
    require_same_groups(gathered)


def layer_wise(parts: list[Part], config):
    """``parts`` sharded by whole parameter over data parallelism.

    ``config``: Megatron-Core's ``OptimizerConfig`` (``use_distributed_optimizer`` off). The torch
    optimizers get Megatron's fp32 wrapper here; in bf16 the layer-wise optimizer wraps them
    itself after the deal, so that fp32 master weights exist only for owned parameters.
    """
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_pg_rank, get_pg_size

    _check_same_groups(parts)
    master_copy = 1 if config.bf16 else 0

    class _LayerWise(LayerWiseDistributedOptimizer):
        def shard_params(self, optimizers):
            """Megatron-Core's ``shard_params`` with :func:`deal` instead of its ping-pong."""
            self.dp_cp_params_list = self.expt_dp_params_list = None
            if get_pg_size(self.pg_collection.dp_cp) == 1:
                return
            groups = [(group, part.state_tensors + master_copy)
                      for part, optimizer in zip(parts, optimizers)
                      for group in optimizer.param_groups]
            for expert, pg in ((False, self.pg_collection.dp_cp),
                               (True, self.pg_collection.expt_dp)):
                entries = [(group, p, p.numel() * tensors) for group, tensors in groups
                           if bool(group.get("is_expert_parallel", False)) == expert
                           for p in group["params"]]
                if not entries:
                    continue
                owners = deal([weight for _, _, weight in entries], get_pg_size(pg))
                params_list = [[] for _ in range(get_pg_size(pg))]
                for (_, p, _), owner in zip(entries, owners):
                    params_list[owner].append(p)
                mine = {id(p) for p in params_list[get_pg_rank(pg)]}
                for group in {id(g): g for g, _, _ in entries}.values():
                    group["params"] = [p for p in group["params"] if id(p) in mine]
                if expert:
                    self.expt_dp_params_list = params_list if len(params_list) > 1 else None
                else:
                    self.dp_cp_params_list = params_list

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

    wrapped = [_Fp32Part(part.optimizer, config, part.init_state) for part in parts]
    groups = ProcessGroupCollection.use_mpu_process_groups(["dp_cp", "expt_dp"])
    return _LayerWise(wrapped, config, groups,
                      init_state_fn_list=[part.init_state for part in parts])


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

