"""Greedy decoding with the Megatron model (no conversion needed), with a KV cache.

The cache is Megatron-Core's own: a ``StaticInferenceContext`` passed to ``GPTModel.forward``
keeps every layer's keys and values, so the prompt is run once (prefill) and then one token per
forward pass; the rotary embedding takes its positions from the context's offset. It runs on CPU
too, through any of megasmol's attention backends, NoPE layers and YaRN included (tested against
the uncached path, which recomputes the whole prefix each step and stays available as
``use_cache=False``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class Decoder:
    """Next-token logits for a growing sequence (batch 1): ``start(prompt)``, then ``step(token)``."""

    def __init__(self, model, max_length: int, use_cache: bool = True):
        self.model, self.max_length, self.use_cache = model, max_length, use_cache
        self.context = None
        self.ids = None

    def _forward(self, ids: torch.Tensor, first_position: int) -> torch.Tensor:
        positions = torch.arange(first_position, first_position + ids.shape[1],
                                 device=ids.device).unsqueeze(0)
        if self.context is None:
            return self.model(ids, positions, None)[:, -1]
        logits = self.model(ids, positions, None, inference_context=self.context,
                            runtime_gather_output=True)
        self.context.increment_sequence_len_offset(ids.shape[1])
        return logits[:, -1]

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        if prompt.shape[0] != 1:
            raise ValueError("the decoder takes one sequence at a time")
        self.ids = prompt
        if self.use_cache:
            from megatron.core.inference.contexts import StaticInferenceContext

            self.context = StaticInferenceContext(1, self.max_length)
        return self._forward(prompt, 0)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` ([1, 1]) and return the logits that follow it."""
        self.ids = torch.cat([self.ids, token], dim=1)
        if self.ids.shape[1] > self.max_length:
            raise ValueError(f"the sequence outgrew the decoder's {self.max_length} positions")
        if self.context is None:
            return self._forward(self.ids, 0)
        return self._forward(token, self.ids.shape[1] - 1)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, use_cache: bool = True,
                    stop: Optional[Callable[[list[int]], bool]] = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` argmax tokens to ``input_ids`` ([1, s]); stop after EOS,
    or once ``stop`` (given the new ids so far) says so."""
    decoder = Decoder(model, input_ids.shape[1] + max_new_tokens, use_cache)
    logits = decoder.start(input_ids)
    for index in range(max_new_tokens):
        next_token = logits.float().argmax(dim=-1, keepdim=True)
        done = index == max_new_tokens - 1 or (eos_token_id is not None
                                               and next_token.item() == eos_token_id)
        if not done and stop is not None:
            done = stop(decoder.ids[0, input_ids.shape[1]:].tolist() + [next_token.item()])
        if done:
            decoder.ids = torch.cat([decoder.ids, next_token], dim=1)
            break
        logits = decoder.step(next_token)
    return decoder.ids
