"""The ``sdpa`` layer spec's linears: Megatron-Core's ``ColumnParallelLinear`` and
``RowParallelLinear`` (same parameters, same checkpoint keys, same training forward) whose forward
without autograd on one tensor-parallel rank is the matmul alone.

Megatron-Core runs every linear through autograd functions even when nothing is trained: the
matmul inside ``LinearWithGradAccumulationAndAsyncCommunication`` (which saves its inputs for a
backward pass) and the identity regions around it on one rank (``copy_to`` before a column
linear, ``reduce_from`` after a row linear). On a CPU, decoding a small model one token at a
time, these wrappers cost about as much as the matmuls they wrap (three linears per layer per
token). Here, without autograd, with one tensor-parallel rank, no bias and no weight passed in,
the forward is ``torch.matmul(input, weight.t())``: the product Megatron-Core's function computes,
the same call on the same tensors (the gather of a column linear's output is the identity on one
rank). Anything else (training, TP > 1, a bias, CPU offloading, deferred embedding gradients)
runs Megatron-Core's own forward.

GPTModel builds its output layer itself (a ``ColumnParallelLinear``, given the embedding's weight
when the two are tied): ``gpt.build_model`` makes it this class's for the ``sdpa`` backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def _matmul_only(layer, weight) -> bool:
    """True where ``layer``'s forward is its matmul by ``weight`` alone: no autograd, one
    tensor-parallel rank, no bias, none of Megatron-Core's side paths."""
    if torch.is_grad_enabled():
        return False
    single = getattr(layer, "_megasmol_single_rank", None)
    if single is None:  # the group and the options are fixed once built
        config = layer.config
        single = (layer.tp_group.size() == 1 and getattr(layer, "bias", None) is None
                  and not layer.sequence_parallel and not layer.explicit_expert_comm
                  and not config.defer_embedding_wgrad_compute)
        layer._megasmol_single_rank = single
    return (single and isinstance(weight, torch.Tensor)
            and layer.config._cpu_offloading_context is None)


class ForwardOnlyColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        product = self.weight if weight is None else weight
        if _matmul_only(self, product) and product.shape == (self.output_size_per_partition, self.input_size):
            return torch.matmul(input_, product.t()), None
        return super().forward(input_, weight, runtime_gather_output)


class ForwardOnlyRowParallelLinear(RowParallelLinear):
    def forward(self, input_: torch.Tensor):
        if _matmul_only(self, self.weight):
            return torch.matmul(input_, self.weight.t()), None
        return super().forward(input_)
