"""Keys rotated once, as they enter Megatron-Core's static KV cache, instead of at every step.

Megatron-Core's ``StaticInferenceContext`` keeps the keys before their rotary embedding and
rotates the whole cache again in every decoding pass of every layer (``k_pos_emb[:end]`` applied
to all cached keys): on the CPU about 15% of a decoding step of the RL bench's model, growing with
the sequence. Its own remedy, ``flash_decode`` (keys rotated before they are stored), runs
flash-attn's CUDA kernel and is refused with NoPE layers (SmolLM3's) and with YaRN.

This ``SelfAttention`` (the ``sdpa`` backend's, through its layer spec) rotates a pass's new keys
at their own positions, lets Megatron-Core's ``_adjust_key_value_for_inference`` store them and
return the cache, and hands the forward pass a rotary embedding for the queries only (no key
embedding: the keys are rotated), as Megatron-Core's dynamic inference context does; where the
queries and keys share one embedding (always, in megasmol's models) the pass's queries are rotated
in the same call as its keys (one rotation of the two concatenated, none left for the forward). The same
elementwise rotation of each key at the same position: the same logits to float rounding (tested
against the uncached pass). Training, NoPE layers and every pass without a static cache go
through Megatron-Core unchanged."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor


class RotatedCacheSelfAttention(SelfAttention):
    def _adjust_key_value_for_inference(self, inference_context, query: Tensor, key: Tensor,
                                        value: Tensor, rotary_pos_emb,
                                        rotary_pos_cos: Optional[Tensor] = None,
                                        rotary_pos_sin: Optional[Tensor] = None,
                                        rotary_pos_cos_sin: Optional[Tensor] = None,
                                        sequence_len_offset: Optional[int] = None, *,
                                        inference_params=None):
        plain = (inference_context is None or inference_params is not None
                 or not inference_context.is_static_batching() or self.config.flash_decode
                 or rotary_pos_emb is None or rotary_pos_emb[1] is None)
        together = False
        if not plain:
            q_pos_emb, k_pos_emb = rotary_pos_emb
            start = inference_context.sequence_len_offset
            freqs = k_pos_emb[start:start + key.size(0)]
            # The queries sit at the keys' positions: one rotation of both (the same elementwise
            # products) where they share the embedding and a dtype.
            together = (q_pos_emb is k_pos_emb and query.dtype == key.dtype
                        and query.shape[:2] + query.shape[3:] == key.shape[:2] + key.shape[3:])
            both = torch.cat([query, key], dim=2) if together else key
            both = apply_rotary_pos_emb(both, freqs, config=self.config,
                                        mscale=_yarn_get_concentration_factor_from_config(self.config),
                                        cp_group=self.pg_collection.cp)
            if together:
                query, key = both.split([query.size(2), key.size(2)], dim=2)
            else:
                key = both
        query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
            rotary_pos_cos_sin, sequence_len_offset, inference_params=inference_params)
        if not plain:  # the cached keys are rotated already, and the queries with them if together
            rotary_pos_emb = None if together else (rotary_pos_emb[0], None)
        return query, key, value, rotary_pos_emb, mask_type, block_table
