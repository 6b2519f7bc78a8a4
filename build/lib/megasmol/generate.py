"""Greedy decoding with the Megatron model (no conversion needed)."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` argmax tokens to ``input_ids`` ([1, s]).

    Each step runs the full prefix (no KV cache): simple and exact, fine for the CPU-sized
    models and prompts this is meant for.
    """
    ids = input_ids
    for _ in range(max_new_tokens):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        logits = model(ids, positions, None)
        next_token = logits[:, -1].float().argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        if eos_token_id is not None and next_token.item() == eos_token_id:
            break
    return ids
