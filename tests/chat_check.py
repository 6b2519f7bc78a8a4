"""Packed vs one-conversation-per-sequence losses through one model, on any parallel layout
(context parallelism included: each rank scores its share of every sequence).

Shared by the single-process test and the TP=2 / PP=2 torchrun worker.
"""

import torch

from megasmol.data.loader import TokenIds, _collate
from megasmol.data.masked.dataset import open_chat_dataset
from megasmol.data.masking import context_parallel_share, model_inputs
from megasmol.model.gpt import build_model
from megasmol.runtime.distributed import set_seed
from megasmol.train.step import forward_backward, global_loss


def summed_losses(spec, prefix, cache_dir, seq_length=128) -> dict:
    """{packing: (summed loss over every supervised token, token count, sequences)}."""
    set_seed(3)
    model = build_model(spec).eval()
    ids = TokenIds.from_spec(spec)
    out = {}
    for packing in ("ffd", "none"):
        data = open_chat_dataset(prefix, seq_length, ids, packing=packing, cache_dir=cache_dir)
        batches = [context_parallel_share(model_inputs(_collate([data.packed_sample(i)]),
                                                       spec.eos_token_id, True, "sbhd"))
                   for i in range(data.plan.num_sequences)]
        with torch.no_grad():
            totals = global_loss(forward_backward(model, batches, forward_only=True))
        out[packing] = (totals.loss * totals.tokens, totals.tokens, data.plan.num_sequences)
    return out
