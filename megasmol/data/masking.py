"""Document masking: how a packed micro-batch reaches the model for each attention backend.

A training sequence packs several documents, each ending in EOS. With document masking,
attention stays inside each document and the prediction made from a document's EOS (the next
document's first token) gets no loss; the loss mask for that comes from the dataset
(``eod_mask_loss``). How the boundaries are handed to attention depends on the backend, one
small function per format, chosen from a table like a layer spec:

* ``thd`` (Transformer Engine): the micro-batch is flattened to one [1, b*s] token stream with
  ``PackedSeqParams(qkv_format="thd", cu_seqlens)``; TE runs variable-length attention and
  Megatron applies RoPE per document;
* ``sbhd`` (megasmol's SDPA attention): [b, s] stays as is, with cu_seqlens over the flattened
  stream; FlexAttention on GPU, a dense block-causal mask on CPU;
* ``dense`` (Megatron's local attention): a [b, 1, s, s] boolean mask, True = masked.

RoPE is relative, so whether position ids restart per document does not change attention inside
a document; ``reset_position_ids`` only matters for absolute position schemes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megasmol.model.attention import block_causal_mask

BACKEND_MASK_FORMAT = {"te": "thd", "sdpa": "sbhd", "local": "dense"}
TOKEN_FIELDS = ("tokens", "position_ids", "labels", "loss_mask", "segments", "ref_logps",
                "rollout_logps", "rollout_entropies", "old_logps", "ref_token_logps", "advantages")


@dataclass
class ModelInputs:
    """Tensors for one forward pass of ``GPTModel`` plus its loss mask."""

    tokens: Tensor
    position_ids: Tensor
    labels: Tensor
    loss_mask: Tensor
    attention_mask: Optional[Tensor] = None
    packed_seq_params: Optional[PackedSeqParams] = None
    segments: Optional[Tensor] = None
    """Preference pairs: which document each label belongs to (2k: pair k's chosen half, 2k+1: its
    rejected half, -1: none), unique within the micro-batch; None for other data."""
    ref_logps: Optional[Tensor] = None
    """Preference pairs: each document's reference log-probability (float64), held at one of its
    label positions (zeros elsewhere), so a sum per segment gives it on any split."""
    rollout_logps: Optional[Tensor] = None
    """RL completions: each completion token's log-prob as the decoder sampled it (the on-policy
    check compares the trainer's with it); only in a rollout batch's first update."""
    rollout_entropies: Optional[Tensor] = None
    """RL completions: the entropy of the decoder's distribution at each completion token, the
    trainer's own in a rollout batch's first update (the ``entropy`` metric); only there."""
    old_logps: Optional[Tensor] = None
    """RL completions: each token's log-prob before the rollout batch's first update (present
    when ``rl.num_iterations`` > 1; else the current ones, detached, are the old ones)."""
    ref_token_logps: Optional[Tensor] = None
    """RL completions: each token's log-prob under the reference model (``rl.beta`` > 0)."""
    advantages: Optional[Tensor] = None
    """RL completions: the completion's advantage at each of its tokens."""

    def token_fields(self) -> dict[str, Tensor]:
        """The per-token tensors ([b, s] or [1, t]) that every split of the sequence must carry."""
        return {k: getattr(self, k) for k in TOKEN_FIELDS if getattr(self, k) is not None}

    def to(self, device) -> ModelInputs:
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
                 for k, v in vars(self).items() if k != "packed_seq_params"}
        params = self.packed_seq_params
        if params is not None:
            params = PackedSeqParams(**{k: (v.to(device) if isinstance(v, Tensor) else v)
                                        for k, v in vars(params).items()})
        return ModelInputs(**moved, packed_seq_params=params)


def document_ids(tokens: Tensor, eod_id: int) -> Tensor:
    """[b, s] index of the document each token belongs to (an EOS closes its own document)."""
    ends = (tokens == eod_id).long()
    return torch.cumsum(ends, dim=1) - ends


def cu_seqlens(tokens: Tensor, eod_id: int) -> Tensor:
    """Document boundaries over the flattened [b*s] stream, sample boundaries included (int32)."""
    b, s = tokens.shape
    flat = tokens.reshape(-1)
    after_eod = torch.nonzero(flat == eod_id).flatten() + 1
    row_starts = torch.arange(0, b * s + 1, s, device=tokens.device)
    bounds = torch.unique(torch.cat([row_starts, after_eod]))
    return bounds.to(torch.int32)


def restarted_positions(tokens: Tensor, eod_id: int) -> Tensor:
    doc = document_ids(tokens, eod_id)
    s = tokens.size(1)
    index = torch.arange(s, device=tokens.device).expand_as(tokens)
    # The first index of each token's document, carried forward along the row.
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index))
    first = torch.cummax(first, dim=1).values
    return index - first


def _thd(batch: dict, eod_id: int) -> ModelInputs:
    bounds = cu_seqlens(batch["tokens"], eod_id)
    longest = int((bounds[1:] - bounds[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    flat = {k: batch[k].reshape(1, -1) for k in TOKEN_FIELDS if k in batch}
    return ModelInputs(**flat, packed_seq_params=params)


def _sbhd(batch: dict, eod_id: int) -> ModelInputs:
    bounds = cu_seqlens(batch["tokens"], eod_id)
    # Megatron sizes the rotary table from max_seqlen when packed parameters are present; in
    # sbhd the positions run over the whole row, so that is the row length.
    length = batch["tokens"].size(1)
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                             max_seqlen_q=length, max_seqlen_kv=length)
    return ModelInputs(**_fields(batch), packed_seq_params=params)


def _fields(batch: dict) -> dict:
    return {k: batch[k] for k in TOKEN_FIELDS if k in batch}


def _dense(batch: dict, eod_id: int) -> ModelInputs:
    allowed = block_causal_mask(document_ids(batch["tokens"], eod_id))
    return ModelInputs(**_fields(batch), attention_mask=~allowed)


MASK_FORMATS = {"thd": _thd, "sbhd": _sbhd, "dense": _dense}


def model_inputs(batch: dict, eod_id: int, document_masking: bool, mask_format: str,
                 reset_position_ids: bool = False) -> ModelInputs:
    """Turn a collated dataset batch ([b, s] tensors) into what the model's forward takes."""
    if reset_position_ids:
        batch = {**batch, "position_ids": restarted_positions(batch["tokens"], eod_id)}
    if "segments" in batch:  # unique within the micro-batch, however it is flattened or split
        segments = batch["segments"]
        rows = torch.arange(segments.size(0), device=segments.device).unsqueeze(1) * segments.size(1)
        batch = {**batch, "segments": torch.where(segments >= 0, segments + rows, segments)}
    if not document_masking:
        return ModelInputs(**_fields(batch))
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"unknown document mask format {mask_format!r}; known: {', '.join(MASK_FORMATS)}")
    return MASK_FORMATS[mask_format](batch, eod_id)


def pad_documents(inputs: ModelInputs, multiple: int) -> ModelInputs:
    """THD inputs with every document padded to a multiple of ``multiple`` tokens.

    Transformer Engine's context parallelism on packed sequences splits each document into
    2 x CP chunks, so each must be divisible by 2 x CP. The real tokens keep their order; each
    document's padding follows it (token 0, no loss), ``cu_seqlens`` keep the real lengths and
    ``cu_seqlens_*_padded`` give the offsets in the padded stream, TE's convention.
    """
    params = inputs.packed_seq_params
    if params is None or params.qkv_format != "thd":
        raise ValueError("pad_documents takes THD inputs (data.document_masking with the te backend)")
    bounds = params.cu_seqlens_q.long()
    lengths = bounds[1:] - bounds[:-1]
    padded_lengths = (lengths + multiple - 1) // multiple * multiple
    padded_bounds = torch.cat([bounds.new_zeros(1), torch.cumsum(padded_lengths, 0)])
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=bounds.device), lengths)
    target = padded_bounds[doc] + torch.arange(doc.numel(), device=bounds.device) - bounds[doc]
    total = int(padded_bounds[-1])

    def spread(values: Tensor) -> Tensor:
        out = values.new_zeros(1, total)
        out[0, target] = values.reshape(-1)
        return out

    longest = int(padded_lengths.max())
    padded = padded_bounds.to(torch.int32)
    fields = {k: spread(v) for k, v in inputs.token_fields().items()}
    if "segments" in fields:  # padding belongs to no document
        fields["segments"][0, torch.ones(total, dtype=torch.bool).index_fill_(0, target, False)] = -1
    return ModelInputs(
        **fields,
        packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=params.cu_seqlens_q, cu_seqlens_kv=params.cu_seqlens_kv,
            cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
            max_seqlen_q=longest, max_seqlen_kv=longest))


def device_inputs(micro: list[dict], eod_id: int, document_masking: bool, mask_format: str,
                  reset_position_ids: bool = False) -> list[ModelInputs]:
    """Collated micro-batches as model inputs on this rank's device, each cut to this rank's
    context-parallel share: for training, validation, reference log-probs and the pre-flight."""
    from megasmol.runtime.distributed import current_device

    return [context_parallel_share(model_inputs(mb, eod_id, document_masking, mask_format,
                                                reset_position_ids)).to(current_device())
            for mb in micro]


def context_parallel_share(inputs: ModelInputs) -> ModelInputs:
    """This context-parallel rank's part of a micro-batch.

    * causal [b, s] inputs and sbhd document boundaries (the sdpa backend): Megatron-Core's
      load-balanced split, the sequence cut into 2 x CP chunks of which rank r keeps r and
      2CP-1-r, so every rank has the same causal work. The boundaries stay over the whole
      sequence: the sdpa attention gathers K/V from the group and masks in global positions.
      Megatron sizes the rotary table from ``max_seqlen`` (the full row) and takes this rank's
      share of it itself.
    * THD (the te backend): every document padded to a multiple of 2 x CP x TP (TP so that
      sequence parallelism can split each rank's share), then the same split per document
      through Megatron-Core's ``get_thd_batch_on_this_cp_rank`` (TE's indices).
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank, get_thd_batch_on_this_cp_rank

    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return inputs
    if inputs.attention_mask is not None:
        raise ValueError("context parallelism cannot split a dense [s, s] attention mask "
                         "(the local attention backend)")
    params = inputs.packed_seq_params
    if params is not None and params.qkv_format == "thd":
        padded = pad_documents(inputs, 2 * cp_size * parallel_state.get_tensor_model_parallel_world_size())
        fields = padded.token_fields()
        longest = torch.tensor([padded.packed_seq_params.max_seqlen_q])
        fields, params = get_thd_batch_on_this_cp_rank(
            fields, padded.packed_seq_params.cu_seqlens_q, padded.packed_seq_params.cu_seqlens_q_padded,
            longest)
        return ModelInputs(**fields, packed_seq_params=params)
    return ModelInputs(**get_batch_on_this_cp_rank(inputs.token_fields()), packed_seq_params=params)
