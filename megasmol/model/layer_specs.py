"""Layer specs: which implementation each transformer submodule uses, chosen by spec.

Three backends, all saving the same checkpoint keys (Megatron-Core maps the local norms onto
Transformer Engine's fused-norm names), so a checkpoint moves freely between them:
* ``te``:    Transformer Engine fused norm+linear and attention kernels (BF16/FP8);
* ``sdpa``:  Megatron-Core local linears + megasmol's SDPA/FlexAttention core attention and its
             MLP (``model/mlp.py``: the gated unit as two matmuls when there is no autograd),
             keys rotated once as they enter a KV cache (``model/cached_rotary.py``), the
             linears a bare matmul when there is no autograd on one TP rank
             (``model/forward_linear.py``);
* ``local``: Megatron-Core's local spec as is (reference attention, materializes s x s scores).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megasmol.config.typed import ConfigError
from megasmol.model.attention import SDPACoreAttention
from megasmol.model.cached_rotary import RotatedCacheSelfAttention
from megasmol.model.forward_linear import ForwardOnlyColumnParallelLinear, ForwardOnlyRowParallelLinear
from megasmol.model.mlp import SplitGateMLP


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def resolve_attention_backend(requested: str) -> str:
    if requested == "auto":
        return "te" if transformer_engine_available() else "sdpa"
    if requested == "te" and not transformer_engine_available():
        raise ConfigError(
            "attention_backend: te needs Transformer Engine and a CUDA GPU "
            "(pip install 'megasmol[gpu]'); use sdpa or auto"
        )
    return requested


def te_layer_spec(qk_norm: bool) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)


def local_layer_spec(qk_norm: bool) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")


def sdpa_layer_spec(qk_norm: bool) -> ModuleSpec:
    spec = copy.deepcopy(local_layer_spec(qk_norm))
    spec.submodules.self_attention.module = RotatedCacheSelfAttention  # model/cached_rotary.py
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    spec.submodules.self_attention.submodules.linear_qkv = ForwardOnlyColumnParallelLinear
    spec.submodules.self_attention.submodules.linear_proj = ForwardOnlyRowParallelLinear
    spec.submodules.mlp = SplitGateMLP  # a class, not a ModuleSpec (see model/mlp.py)
    return spec


LAYER_SPECS = {"te": te_layer_spec, "sdpa": sdpa_layer_spec, "local": local_layer_spec}

NO_CUDA_LITERALS = frozenset({"sdpa"})
"""Backends whose forward passes name no CUDA device, so that on a CPU they need none of the CPU
compatibility mode's redirections once the model is built (Megatron-Core's local attention
builds its causal mask with ``device="cuda"``; Transformer Engine runs on a GPU only)."""


EXPLICIT_MASK_BACKENDS = frozenset({"sdpa", "local"})
"""Backends whose core attention applies an explicit [b, 1, sq, sk] mask in Megatron-Core's
inference passes, as scoring against a KV cache with padded rows needs. Transformer Engine's
attention follows its mask type instead, which Megatron-Core's inference code sets to causal for
a prefill and to no mask after it, so it would not see the padding."""


def forward_only(backend: str):
    """Context for forward passes of a built model (evaluation, generation) with the resolved
    ``backend`` it was built with: the CPU compatibility mode suspended where the backend allows
    it (each torch call under it is a Python call; a forward makes thousands)."""
    from megasmol.runtime import cpu_compat

    if backend in NO_CUDA_LITERALS:
        return cpu_compat.suspended()
    return contextlib.nullcontext()


def layer_spec(backend: str, qk_norm: bool) -> ModuleSpec:
    return LAYER_SPECS[resolve_attention_backend(backend)](qk_norm)
