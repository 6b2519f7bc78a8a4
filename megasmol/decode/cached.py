"""Decoding with the whole model in one process (no conversion needed), with a KV cache.

The cache is Megatron-Core's own: a ``StaticInferenceContext`` passed to ``GPTModel.forward``
keeps every layer's keys and values, so the prompt is run once (prefill) and then one token per
forward pass; the rotary embedding takes its positions from the context's offset. It runs on CPU
too, through any of megasmol's attention backends, NoPE layers and YaRN included (tested against
the uncached path, which recomputes the whole prefix each step and stays available as
``use_cache=False``).

``generate`` decodes several prompts of different lengths together, as Megatron-LM's
static-batch generation does: all rows share one cache offset, the prefill runs up to the
shortest prompt, and from there each step feeds every row its next token, the prompt's own while
the row is still inside its prompt and the chosen one after (greedy, or sampled with the row's own
generator: ``sampling.choose``). Rows that have finished are moved behind the others in the cache
(``swap_key_value_dict``) and leave the batch: the stop rule (EOS, ``stop``, the length limit) is
checked on every row after every token, so a row that writes its stop string costs nothing more.
``on_step`` hears of each step (the new tokens, the rows that finished), for a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from megasmol.decode.completion import Completion, OnStep, Stop, finish_reason, request_limits, request_seeds
from megasmol.decode.sampling import SamplingParams, choose_scored, row_generators


class Decoder:
    """Next-token logits for a growing sequence (batch 1): ``start(prompt)``, then ``step(token)``."""

    def __init__(self, model, max_length: int, use_cache: bool = True):
        self.model, self.max_length, self.use_cache = model, max_length, use_cache
        self.context: Optional[Any] = None
        self.ids = torch.zeros(1, 0, dtype=torch.long)

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
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
             sampling: Optional[SamplingParams] = None, seeds: Optional[Sequence[int]] = None,
             eos_token_id: Optional[int] = None, stop: Optional[Stop] = None,
             on_step: Optional[OnStep] = None, use_cache: bool = True) -> list[Completion]:
    """The continuation of each prompt: at most ``max_new_tokens`` ids (one number, or one per
    prompt), ending after EOS or once ``stop(row, new ids so far)`` says so, with the log-probability
    of each and the entropy of the distribution it was drawn from. ``sampling``: greedy by default;
    a sampled row draws from ``torch.Generator().manual_seed(seeds[row])`` (``seeds`` None: drawn
    from torch's global generator). Rows never see each other (a causal model, no padding inside
    what any row attends to, a generator each), so each gets what it would get alone. After each step,
    ``on_step(ids generated, rows finished)``."""
    sampling = sampling or SamplingParams()
    sampling.validate()
    limits = request_limits(prompts, max_new_tokens)
    rows = len(prompts)
    generators = row_generators(request_seeds(rows, seeds, not sampling.greedy))
    lengths = [len(p) for p in prompts]
    out = [Completion([], [], "length") for _ in prompts]
    active = [row for row in range(rows) if limits[row] > 0]  # cache order: active first
    if not active:
        return out
    total = max(n + m for n, m in zip(lengths, limits))
    tokens = torch.zeros(rows, total, dtype=torch.long, device=next(model.parameters()).device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(list(prompt))
    context = None
    if use_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(rows, total)
    position = min(lengths)
    logits = _last_logits(model, tokens[active, :position], 0, context)
    while True:
        slots = [slot for slot, row in enumerate(active) if position >= lengths[row]]
        finished = []
        if slots:  # the rows past their prompt choose; the others are fed their prompt's token
            choice = choose_scored(logits[slots], sampling, [generators[active[slot]] for slot in slots])
            for slot, token, log_prob, entropy in zip(slots, choice.tokens.tolist(),
                                                      choice.log_probs.tolist(), choice.entropies.tolist()):
                row = active[slot]
                tokens[row, position] = token
                out[row].tokens.append(token)
                out[row].logprobs.append(log_prob)
                out[row].entropies.append(entropy)
                reason = finish_reason(row, out[row].tokens, limits[row], eos_token_id, stop)
                if reason is not None:
                    out[row].finish_reason = reason
                    finished.append(row)
        if on_step is not None:
            on_step(len(slots), len(finished))
        if finished:
            done = set(finished)
            kept = [row for row in active if row not in done]
            if context is not None and kept:
                where = {row: slot for slot, row in enumerate(active)}
                order = [where[row] for row in kept] + [where[row] for row in finished]
                order += range(len(order), rows)
                context.swap_key_value_dict(order)
            active = kept
            if not active:
                return out
        if context is None:
            logits = _last_logits(model, tokens[active, :position + 1], 0, None)
        else:
            logits = _last_logits(model, tokens[active, position:position + 1], position, context)
        position += 1


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
    or once ``stop`` (given the new ids so far) says so. ``generate`` takes several prompts."""
    if input_ids.shape[0] != 1:
        raise ValueError("greedy_generate takes one sequence; generate takes several")
    [done] = generate(model, [input_ids[0].tolist()], max_new_tokens, eos_token_id=eos_token_id,
                      use_cache=use_cache, stop=None if stop is None else (lambda _, ids: stop(ids)))
    new = torch.tensor([done.tokens], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, new], dim=1)
