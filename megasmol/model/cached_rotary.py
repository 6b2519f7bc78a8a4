"""Keys rotated once, as they enter Megatron-Core's static KV cache, instead of at every step.

Megatron-Core's ``StaticInferenceContext`` keeps the keys before their rotary embedding and
rotates the whole cache again in every decoding pass of every layer (``k_pos_emb[:end]`` applied
to all cached keys): on the CPU about 15% of a decoding step of the RL bench's model, growing with
the sequence. Its own remedy, ``flash_decode`` (keys rotated before they are stored), runs
flash-attn's CUDA kernel and is refused with NoPE layers (SmolLM3's) and with YaRN.

This ``SelfAttention`` (the ``sdpa`` backend's, through its layer spec) rotates a pass's new keys
at their own positions, lets Megatron-Core's ``_adjust_key_value_for_inference`` store them and
return the cache, and hands the forward pass a rotary embedding for the queries only (no key
embedding: the keys are rotated), as Megatron-Core's dynamic inference context does. The same
elementwise rotation of each key at the same position: the same logits to float rounding (tested
against the uncached pass). Training, NoPE layers and every pass without a static cache go
through Megatron-Core unchanged."""

from __future__ import annotations

from typing import Optional

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
        if not plain:
            q_pos_emb, k_pos_emb = rotary_pos_emb
            start = inference_context.sequence_len_offset
            key = apply_rotary_pos_emb(key, k_pos_emb[start:start + key.size(0)], config=self.config,
                                       mscale=_yarn_get_concentration_factor_from_config(self.config),
                                       cp_group=self.pg_collection.cp)
        query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
            rotary_pos_cos_sin, sequence_len_offset, inference_params=inference_params)
        if not plain:
            rotary_pos_emb = (rotary_pos_emb[0], None)  # the cached keys are rotated already
        return query, key, value, rotary_pos_emb, mask_type, block_table
