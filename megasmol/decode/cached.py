"""Greedy decoding with the Megatron model (no conversion needed), with a KV cache.

The cache is Megatron-Core's own: a ``StaticInferenceContext`` passed to ``GPTModel.forward``
keeps every layer's keys and values, so the prompt is run once (prefill) and then one token per
forward pass; the rotary embedding takes its positions from the context's offset. It runs on CPU
too, through any of megasmol's attention backends, NoPE layers and YaRN included (tested against
the uncached path, which recomputes the whole prefix each step and stays available as
``use_cache=False``).

``greedy_generate_batch`` decodes several prompts of different lengths together, as Megatron-LM's
static-batch generation does: all rows share one cache offset, the prefill runs up to the
shortest prompt, and from there each step feeds every row its next token, the prompt's own while
the row is still inside its prompt and the model's argmax after. Rows that have finished are
moved behind the others in the cache (``swap_key_value_dict``) and leave the batch: the stop rule
(EOS, ``stop``, the length limit) is checked on every row after every token, so a row that writes
its stop string costs nothing more. ``on_step`` hears of each step (the new tokens, the rows that
finished), for a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from megasmol.errors import InputError


class Decoder:
    """Next-token logits for a growing sequence (batch 1): ``start(prompt)``, then ``step(token)``."""

    def __init__(self, model, max_length: int, use_cache: bool = True):
        self.model, self.max_length, self.use_cache = model, max_length, use_cache
        self.context = None
        self.ids = None

    def _forward(self, ids: torch.Tensor, first_position: int) -> torch.Tensor:
        return _last_logits(self.model, ids, first_position, self.context)

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
def greedy_generate_batch(model, prompts: list[list[int]], max_new_tokens: list[int],
                          eos_token_id: int | None = None, use_cache: bool = True,
                          stop: Optional[Callable[[int, list[int]], bool]] = None,
                          on_step: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """The argmax continuation of each prompt: at most ``max_new_tokens[i]`` ids, ending after EOS
    or once ``stop(i, new ids so far)`` says so. Rows never see each other (a causal model, no
    padding inside what any row attends to), so each gets what it would get alone. After each
    step, ``on_step(ids generated, rows finished)``."""
    rows = len(prompts)
    lengths = [len(p) for p in prompts]
    if rows == 0:
        return []
    if min(lengths) == 0:
        raise InputError("every prompt needs at least one token")
    total = max(n + m for n, m in zip(lengths, max_new_tokens))
    tokens = torch.zeros(rows, total, dtype=torch.long, device=next(model.parameters()).device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    new: list[list[int]] = [[] for _ in prompts]
    active = [row for row in range(rows) if max_new_tokens[row] > 0]  # cache order: active first
    context = None
    if use_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(rows, total)
    position = min(lengths)
    logits = _last_logits(model, tokens[active, :position], 0, context) if active else None
    while active:
        picked = logits.float().argmax(dim=-1).tolist()
        finished, generated = [], 0
        for slot, row in enumerate(active):
            if position < lengths[row]:
                continue  # still inside its prompt: the prompt's token goes in
            token = picked[slot]
            tokens[row, position] = token
            new[row].append(token)
            generated += 1
            if (len(new[row]) >= max_new_tokens[row] or token == eos_token_id
                    or (stop is not None and stop(row, new[row]))):
                finished.append(row)
        if on_step is not None:
            on_step(generated, len(finished))
        if finished:
            done = set(finished)
            kept = [row for row in active if row not in done]
            if context is not None and kept:
                slots = {row: slot for slot, row in enumerate(active)}
                order = [slots[row] for row in kept] + [slots[row] for row in finished]
                order += range(len(order), rows)
                context.swap_key_value_dict(order)
            active = kept
            if not active:
                break
        if context is None:
            logits = _last_logits(model, tokens[active, :position + 1], 0, None)
        else:
            logits = _last_logits(model, tokens[active, position:position + 1], position, context)
        position += 1
    return new


def _last_logits(model, ids: torch.Tensor, first_position: int, context) -> torch.Tensor:
    """Logits after the last of ``ids`` ([b, s], starting at ``first_position``) for each row;
    with a cache, the keys and values of ``ids`` are added to it."""
    positions = torch.arange(first_position, first_position + ids.shape[1], device=ids.device).expand_as(ids)
    with model.forward_only():
        if context is None:
            return model(ids, positions, None)[:, -1]
        logits = model(ids, positions, None, inference_context=context, runtime_gather_output=True)
    context.increment_sequence_len_offset(ids.shape[1])
    return logits[:, -1]


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, use_cache: bool = True,
                    stop: Optional[Callable[[list[int]], bool]] = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` argmax tokens to ``input_ids`` ([1, s]); stop after EOS,
    or once ``stop`` (given the new ids so far) says so."""
    if input_ids.shape[0] != 1:
        raise ValueError("greedy_generate takes one sequence; greedy_generate_batch takes several")
    [new] = greedy_generate_batch(model, [input_ids[0].tolist()], [max_new_tokens], eos_token_id,
                                  use_cache, None if stop is None else (lambda _, ids: stop(ids)))
    return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], dim=1)
