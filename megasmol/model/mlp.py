"""The MLP of the ``sdpa`` layer spec: Megatron-Core's ``MLP`` (same parameters, same checkpoint
keys, same training forward) whose forward without autograd runs the gated unit's two halves as
two matmuls.

Megatron-Core computes ``linear_fc1`` as one [h -> 2 x ffn] matmul and splits its output; the
activation then reads a strided half. On a CPU the one wide output matmul runs about 10% slower
than its two halves inside the model (it is equal in isolation: the wide output leaves the
caches), and evaluation and generation are nearly all matmuls. The halves are the same rows of
the same weight (``[gate; up]``, per tensor-parallel rank), so the result is the same product.
Under autograd, with sequence parallelism, a bias, FP8 or a fused activation, Megatron-Core's
own forward runs.

The layer spec holds the class itself, not a ``ModuleSpec``: Megatron-Core's ``TransformerLayer``
passes the tensor-parallel group to its own ``MLP`` (recognised by identity) and logs "Unknown MLP
type" for any other ``ModuleSpec``. Built from the config alone, this MLP takes the local spec's
column linear, ``model/forward_linear.py``'s row linear (a bare matmul without autograd on one
tensor-parallel rank) and Megatron-Core's default tensor-parallel group, which is the one it would
be given.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules

from megasmol.model.forward_linear import ForwardOnlyRowParallelLinear


class SplitGateMLP(MLP):
    def __init__(self, config, submodules: Optional[MLPSubmodules] = None, **kwargs):
        local = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=ForwardOnlyRowParallelLinear)
        super().__init__(config, submodules if submodules is not None else local, **kwargs)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._splits(per_token_scale):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        config = self.config
        gate, up = self.linear_fc1.weight.chunk(2)
        intermediate = (config.activation_func(F.linear(hidden_states, gate))
                        * (F.linear(hidden_states, up) + config.glu_linear_offset))
        return self.linear_fc2(intermediate)

    def _splits(self, per_token_scale) -> bool:
        config = self.config
        return (not torch.is_grad_enabled() and per_token_scale is None
                and config.gated_linear_unit and not config.sequence_parallel
                and not config.bias_activation_fusion and not config.use_te_activation_func
                and config.activation_func_clamp_value is None and not config.fp8
                and getattr(self.linear_fc1, "bias", None) is None
                and isinstance(getattr(self.linear_fc1, "weight", None), torch.Tensor))
