"""Core attention on PyTorch's ``scaled_dot_product_attention``, as a Megatron-Core submodule.

Megatron-Core's local ``DotProductAttention`` materializes the full [b, heads, s, s] score
matrix and repeats K/V for GQA.  This module is a drop-in ``core_attention`` for the layer spec
(same constructor and forward signature) that calls SDPA, which picks flash / cuDNN /
memory-efficient kernels on GPU and handles GQA without copying K and V.

Masks:
* no mask: causal attention (``is_causal``), the fast path;
* ``attention_mask`` in Megatron's convention ([b, 1, sq, sk] bool, True = masked out);
* document masking via ``PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=...)``: the
  cumulative document boundaries over the flattened [b * s] token stream (``"thd"``, the
  Transformer Engine layout with [t, heads, d] inputs, is accepted too and treated as b = 1).
  Positions are not restarted (RoPE is relative, as in SmolLM3).  On GPU this becomes a
  FlexAttention block mask (only the diagonal blocks are computed); on CPU, where
  FlexAttention has no backward, an equivalent dense block-diagonal causal mask.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor


def document_ids_from_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int) -> Tensor:
    """[b, s] document index of every token, from boundaries over the flattened [b*s] stream."""
    positions = torch.arange(batch * seq_len, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens.to(positions.dtype), positions, right=True) - 1
    return doc.view(batch, seq_len)


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global positions held by one context-parallel rank under Megatron-Core's load-balanced
    split (``get_batch_on_this_cp_rank``): chunks r and 2CP-1-r of 2 x CP equal chunks."""
    chunks = torch.arange(seq_len, device=device).view(2 * cp_size, -1)
    return chunks[[cp_rank, 2 * cp_size - 1 - cp_rank]].reshape(-1)


def positional_mask(q_pos: Tensor, k_pos: Tensor, document_ids: Optional[Tensor], batch: int) -> Tensor:
    """[b, 1, sq, sk] bool, True where the query at global position q_pos[i] may see the key at
    k_pos[j]: not in the future and, with ``document_ids`` [b, s], in the same document."""
    allowed = (q_pos.unsqueeze(1) >= k_pos.unsqueeze(0)).expand(batch, -1, -1)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, q_pos].unsqueeze(2) == document_ids[:, k_pos].unsqueeze(1))
    return allowed.unsqueeze(1)


def block_causal_mask(document_ids: Tensor) -> Tensor:
    """[b, 1, s, s] bool, True where attention is allowed (same document, not in the future)."""
    positions = torch.arange(document_ids.size(1), device=document_ids.device)
    return positional_mask(positions, positions, document_ids, document_ids.size(0))


def _flex_positional_attention(q, k, v, q_pos: Tensor, k_pos: Tensor,
                               document_ids: Optional[Tensor], scale: float) -> Tensor:
    """Causal (and document) attention where query/key index i sits at global position pos[i]."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]

    def mask_mod(batch, head, q_idx, kv_idx):
        qp, kp = q_pos[q_idx], k_pos[kv_idx]
        allowed = qp >= kp
        if document_ids is not None:
            allowed = allowed & (document_ids[batch, qp] == document_ids[batch, kp])
        return allowed

    block_mask = create_block_mask(mask_mod, b if document_ids is not None else None, None, sq, sk,
                                   device=q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


@functools.cache
def _compiled_flex():
    # FlexAttention is only fused (and memory-light) when compiled; compile once per process.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _segment_bounds(params: PackedSeqParams) -> Tensor:
    # Padded THD streams (documents padded for context parallelism) lay documents out at the
    # padded offsets; a document's padding follows it and belongs to its segment.
    padded = params.cu_seqlens_q_padded
    return params.cu_seqlens_q if padded is None else padded


class SDPACoreAttention(MegatronModule):
    """Replaces Megatron-Core's DotProductAttention through the layer spec."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp_size = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the sdpa attention backend")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            # [t, heads, d]: one packed stream; the same block-causal attention as sbhd with b=1.
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        mask_type = attn_mask_type or self.attn_mask_type

        if self.cp_group is not None:
            if thd or attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError("the sdpa backend's context parallelism takes causal attention with "
                                 "optional document masking in the sbhd format only")
            out = self._context_parallel(q, key, value, packed_seq_params, dropout)
        elif packed_seq_params is not None:
            positions = torch.arange(sq, device=q.device)
            doc_ids = document_ids_from_cu_seqlens(_segment_bounds(packed_seq_params), b, sq)
            out = self._masked(q, k, v, positions, positions, doc_ids, dropout)
        elif attention_mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout,
                scale=self.softmax_scale, enable_gqa=True,
            )
        else:
            # With a KV cache a single query attends to everything before it.
            causal = mask_type == AttnMaskType.causal and sq == k.shape[2]
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, dropout_p=dropout, scale=self.softmax_scale,
                enable_gqa=True,
            )
        # [b, heads, s, d] -> [s, b, heads * d]  ([t, heads * d] for THD)
        out = out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)
        return out.squeeze(1) if thd else out

    def _context_parallel(self, q: Tensor, key: Tensor, value: Tensor,
                          packed_seq_params: Optional[PackedSeqParams], dropout: float) -> Tensor:
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        b, sq = q.shape[0], q.shape[2]
        full = sq * cp_size
        # [s/cp, b, g, d] -> [s, b, g, d], rank-major: rank r's two chunks follow rank r-1's.
        k, v = (gather_from_sequence_parallel_region(t, group=self.cp_group).permute(1, 2, 0, 3)
                for t in (key, value))
        q_pos = context_parallel_positions(full, cp_size, cp_rank, q.device)
        k_pos = torch.cat([context_parallel_positions(full, cp_size, r, q.device) for r in range(cp_size)])
        doc_ids = None
        if packed_seq_params is not None:
            doc_ids = document_ids_from_cu_seqlens(_segment_bounds(packed_seq_params), b, full)
        return self._masked(q, k, v, q_pos, k_pos, doc_ids, dropout)

    def _masked(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                doc_ids: Optional[Tensor], dropout: float) -> Tensor:
        """Causal (and document) attention in global positions: a FlexAttention block mask on
        GPU (no s x s tensor), the equivalent dense mask on CPU or with dropout."""
        if q.is_cuda and dropout == 0.0:
            return _flex_positional_attention(q, k, v, q_pos, k_pos, doc_ids, self.softmax_scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=positional_mask(q_pos, k_pos, doc_ids, q.shape[0]), dropout_p=dropout,
            scale=self.softmax_scale, enable_gqa=True,
        )
