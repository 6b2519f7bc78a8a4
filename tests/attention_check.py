"""Compare megasmol's SDPA attention with Megatron-Core's local attention on one model.

Shared by the single-process test and the TP=2 torchrun worker.
"""

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megasmol.model.attention import block_causal_mask
from megasmol.model.gpt import build_model
from megasmol.runtime.distributed import set_seed


def build_pair(spec):
    models = {}
    for backend in ("local", "sdpa"):
        set_seed(11)
        models[backend] = build_model(spec.replace(attention_backend=backend))
    return models


def document_inputs(vocab: int, batch: int = 2, seq: int = 32):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    # Documents of uneven length in each row; boundaries over the flattened [b*s] stream.
    boundaries = [0, 5, 17, 32, 32 + 9, 64]
    cu = torch.tensor(boundaries, dtype=torch.int32)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    flat = doc_ids.view(-1)
    for index, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        flat[start:end] = index
    mask_allowed = block_causal_mask(doc_ids)
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=seq, max_seqlen_kv=seq)
    return ids, positions, ~mask_allowed, packed


def outputs_and_grads(model, ids, positions, mask=None, packed=None):
    model.zero_grad()
    loss = model(ids, positions, mask, labels=ids, packed_seq_params=packed)
    loss.float().sum().backward()
    logits = model(ids, positions, mask, packed_seq_params=packed).detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, grads


def max_relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def compare(spec) -> dict:
    """Relative differences (logits, worst gradient) for causal and document-masked runs."""
    models = build_pair(spec)
    for name, p in models["local"].named_parameters():
        assert torch.equal(p, dict(models["sdpa"].named_parameters())[name])
    ids, positions, masked_out, packed = document_inputs(spec.vocab_size)
    results = {}
    cases = {
        "causal": ({}, {}),
        "document_dense_mask": ({"mask": masked_out}, {"mask": masked_out}),
        "document_cu_seqlens": ({"mask": masked_out}, {"packed": packed}),
    }
    for case, (local_kwargs, sdpa_kwargs) in cases.items():
        ref_logits, ref_grads = outputs_and_grads(models["local"], ids, positions, **local_kwargs)
        logits, grads = outputs_and_grads(models["sdpa"], ids, positions, **sdpa_kwargs)
        results[case] = (
            max_relative_difference(logits, ref_logits),
            max(max_relative_difference(grads[n], ref_grads[n]) for n in ref_grads),
        )
    # Document masking must change the result (else the mask comparison proves nothing).
    causal_logits, _ = outputs_and_grads(models["sdpa"], ids, positions)
    doc_logits, _ = outputs_and_grads(models["sdpa"], ids, positions, packed=packed)
    results["mask_effect"] = max_relative_difference(doc_logits, causal_logits)
    return results
