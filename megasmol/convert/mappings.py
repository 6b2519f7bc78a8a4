"""Declarative weight mappings between megasmol (Megatron-Core) and Hugging Face names.

One row per tensor kind, shared by export and import so the two cannot drift apart.  Megatron
keys are the canonical ``dist_checkpointing`` names (Transformer Engine naming, which Megatron's
local spec maps its norms onto); layer-stacked keys hold ``[num_layers, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from megasmol.model.spec import ModelSpec

Layout = Literal["copy", "qkv", "gate_up"]


@dataclass(frozen=True)
class WeightMapping:
    megatron: str
    """Canonical Megatron key."""
    hf: tuple[str, ...]
    """HF names; ``{i}`` is the layer index.  Several names means a fused Megatron tensor."""
    per_layer: bool
    """Stacked over layers in the checkpoint."""
    layout: Layout = "copy"
    """How the HF tensors fuse into the Megatron one."""
    when: Callable[[ModelSpec], bool] = lambda spec: True
    """Whether the row applies to a spec (e.g. untied output layer)."""


L = "model.layers.{i}."
MAPPINGS: tuple[WeightMapping, ...] = (
    WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), False),
    WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",), False),
    WeightMapping("output_layer.weight", ("lm_head.weight",), False,
                  when=lambda spec: not spec.tie_embeddings),
    WeightMapping("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                  (L + "input_layernorm.weight",), True),
    WeightMapping("decoder.layers.self_attention.linear_qkv.weight",
                  (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
                   L + "self_attn.v_proj.weight"), True, "qkv"),
    WeightMapping("decoder.layers.self_attention.linear_proj.weight",
                  (L + "self_attn.o_proj.weight",), True),
    WeightMapping("decoder.layers.mlp.linear_fc1.layer_norm_weight",
                  (L + "post_attention_layernorm.weight",), True),
    WeightMapping("decoder.layers.mlp.linear_fc1.weight",
                  (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), True, "gate_up"),
    WeightMapping("decoder.layers.mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",), True),
)


def mappings_for(spec: ModelSpec) -> list[WeightMapping]:
    return [m for m in MAPPINGS if m.when(spec)]


def split(mapping: WeightMapping, tensor: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    """Megatron tensor (one layer) -> HF tensors, in the order of ``mapping.hf``."""
    if mapping.layout == "copy":
        return [tensor]
    if mapping.layout == "gate_up":
        gate, up = tensor.chunk(2, dim=0)
        return [gate, up]
    # Megatron interleaves QKV per query group: [q heads of the group, k, v] for each group.
    groups, d = spec.num_kv_heads, spec.kv_channels
    q_per_group = spec.num_attention_heads // groups
    grouped = tensor.view(groups, q_per_group + 2, d, -1)
    q = grouped[:, :q_per_group].reshape(-1, tensor.shape[-1])
    k = grouped[:, q_per_group].reshape(-1, tensor.shape[-1])
    v = grouped[:, q_per_group + 1].reshape(-1, tensor.shape[-1])
    return [q, k, v]


def fuse(mapping: WeightMapping, tensors: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """HF tensors (one layer) -> the Megatron tensor; the inverse of :func:`split`."""
    if mapping.layout == "copy":
        return tensors[0]
    if mapping.layout == "gate_up":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    groups, d = spec.num_kv_heads, spec.kv_channels
    hidden = q.shape[-1]
    q = q.view(groups, -1, d, hidden)
    return torch.cat([q, k.view(groups, 1, d, hidden), v.view(groups, 1, d, hidden)], dim=1
                     ).reshape(-1, hidden)


def expected_hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the spec implies (for import checks)."""
    h, d, f, v = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size, spec.vocab_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (spec.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (spec.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (spec.num_kv_heads * d, h),
        "self_attn.o_proj.weight": (h, spec.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(spec.num_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes
