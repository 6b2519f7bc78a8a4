"""Decoding with the whole model in one process (no conversion needed), with a KV cache.

The cache is Megatron-Core's own: a ``StaticInferenceContext`` passed to ``GPTModel.forward``
keeps every layer's keys and values, so the prompt is run once (prefill) and then one token per
forward pass; the rotary embedding takes its positions from the context's offset. It runs on CPU
too, through any of megasmol's attention backends, NoPE layers and YaRN included (tested against
the uncached path, which recomputes the whole prefix each step and stays available as
``use_cache=False``).

``generate`` decodes several prompts of different lengths together. With megasmol's attention
backends that take an explicit mask (``sdpa``, ``local``: ``layer_specs.EXPLICIT_MASK_BACKENDS``)
the prompts are left-padded to the longest and the padding is masked out, so every row chooses
from the first pass on and a batch costs one prefill plus one pass per new token whatever its
prompts' lengths; each distinct prompt is prefilled once and the copies of it (RL's
``num_generations``) start from its keys and values. Left padding shifts a row's positions by its
padding, which rotary embeddings do not see (they depend on distances): float rounding only, as
in the trainer's packing, whose positions are not restarted either. Transformer Engine's attention
follows its mask type instead, so there (and without a cache) all rows share one cache offset, as
Megatron-LM's static-batch generation does: the prefill runs up to the shortest prompt and each
step feeds the rows still inside their prompt their prompt's next token.

Each row chooses greedily or samples with its own generator (``sampling.choose``). Rows that
have finished leave the batch and the cache at once: the stop rule (EOS, ``stop``, the length
limit) is checked on every row after every token, so a row that writes its stop string costs
nothing more. ``on_step`` hears of each step (the new tokens, the rows that finished), for a
progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from megasmol.decode.completion import Completion, OnStep, Stop, finish_reason, request_limits, request_seeds
from megasmol.decode.sampling import SamplingParams, UniformStreams, choose_scored, row_generators
from megasmol.model.layer_specs import EXPLICIT_MASK_BACKENDS
from megasmol.runtime import cpu_compat


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
    from torch's global generator). Rows never see each other (a causal model, padding masked out,
    a generator each), so each gets what it would get alone (to float rounding: a left-padded row's
    positions are shifted, which rotary embeddings do not see). After each step,
    ``on_step(ids generated, rows finished)``."""
    sampling = sampling or SamplingParams()
    sampling.validate()
    limits = request_limits(prompts, max_new_tokens)
    rows = len(prompts)
    generators = row_generators(request_seeds(rows, seeds, not sampling.greedy))
    out = [Completion([], [], "length") for _ in prompts]
    active = [row for row in range(rows) if limits[row] > 0]  # cache order: active first
    if not active:
        return out
    run = _Run(sampling, generators, limits, eos_token_id, stop, on_step, out)
    if use_cache and getattr(model, "attention_backend", None) in EXPLICIT_MASK_BACKENDS:
        _generate_left_padded(model, prompts, active, run)
    else:
        _generate_shared_offset(model, prompts, active, run, use_cache)
    return out


class _Run:
    """What one ``generate`` call chooses with and records into, shared by both batching rules."""

    def __init__(self, sampling: SamplingParams, generators: list[torch.Generator], limits: list[int],
                 eos_token_id: Optional[int], stop: Optional[Stop], on_step: Optional[OnStep],
                 out: list[Completion]):
        self.sampling, self.limits = sampling, limits
        self.uniforms = UniformStreams(generators)
        self.eos_token_id, self.stop, self.on_step, self.out = eos_token_id, stop, on_step, out

    def choose(self, logits: torch.Tensor, rows: list[int]) -> tuple[list[int], list[int]]:
        """Each of ``rows`` chooses its next token from its ``logits``; returns the tokens and the
        rows that finished with them (``on_step`` hears of both)."""
        uniform = None if self.sampling.greedy else self.uniforms.next(rows)
        with cpu_compat.suspended():  # a few dozen torch calls per token, none naming a device
            choice = choose_scored(logits, self.sampling, uniform=uniform)
        tokens, finished = choice.tokens.tolist(), []
        for row, token, log_prob, entropy in zip(rows, tokens, choice.log_probs.tolist(),
                                                 choice.entropies.tolist()):
            done = self.out[row]
            done.tokens.append(token)
            done.logprobs.append(log_prob)
            done.entropies.append(entropy)
            reason = finish_reason(row, done.tokens, self.limits[row], self.eos_token_id, self.stop)
            if reason is not None:
                done.finish_reason = reason
                finished.append(row)
        if self.on_step is not None:
            self.on_step(len(rows), len(finished))
        return tokens, finished


def _generate_left_padded(model, prompts: Sequence[Sequence[int]], active: list[int], run: _Run) -> None:
    """Every prompt left-padded to the longest, so every row chooses from the first pass on: one
    prefill of each distinct prompt (the copies of a prompt, e.g. RL's group, share its keys and
    values), then one pass per new token, the padding hidden by an explicit mask."""
    from megatron.core.inference.contexts import StaticInferenceContext

    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    source = [distinct.setdefault(tuple(prompts[row]), len(distinct)) for row in active]
    width = max(len(prompt) for prompt in distinct)
    total = width + max(run.limits[row] for row in active)
    ids = torch.zeros(len(distinct), width, dtype=torch.long)
    hidden = torch.zeros(len(distinct), total, dtype=torch.bool)  # keys a row never sees: its padding
    for index, prompt in enumerate(distinct):
        ids[index, width - len(prompt):] = torch.tensor(prompt)
        hidden[index, :width - len(prompt)] = True
    padded = bool(hidden.any())
    keys = torch.arange(width)
    mask = None
    if padded:  # causal | padding; a padding row still sees itself (no row without a key)
        mask = (keys[None, :] > keys[:, None])[None] | hidden[:, None, :width]
        mask = (mask & ~torch.eye(width, dtype=torch.bool)[None]).unsqueeze(1).to(device)
    context = StaticInferenceContext(len(distinct), total)
    logits = _masked_last_logits(model, ids.to(device), keys, mask, context)
    slots = torch.tensor(source)
    if len(distinct) < len(active):
        logits = logits[slots.to(device)]
    hidden = hidden[slots].to(device)
    _keep_cache_rows(context, slots)
    position = width
    while True:
        tokens, finished = run.choose(logits, active)
        if finished:
            done = set(finished)
            kept = [slot for slot, row in enumerate(active) if row not in done]
            if not kept:
                return
            active = [active[slot] for slot in kept]
            tokens = [tokens[slot] for slot in kept]
            kept_slots = torch.tensor(kept)
            _keep_cache_rows(context, kept_slots)
            hidden = hidden[kept_slots.to(device)]
        step = torch.tensor(tokens, device=device).unsqueeze(1)
        mask = hidden[:, None, None, :position + 1] if padded else None
        logits = _masked_last_logits(model, step, torch.arange(position, position + 1), mask, context)
        position += 1


def _keep_cache_rows(context, slots: torch.Tensor) -> None:
    """The cache's rows become ``slots`` (in that order; a slot may repeat)."""
    for layer, (key, value) in context.key_value_memory_dict.items():
        on = slots.to(key.device)
        context.key_value_memory_dict[layer] = (key.index_select(1, on), value.index_select(1, on))


def _masked_last_logits(model, ids: torch.Tensor, positions: torch.Tensor, mask: Optional[torch.Tensor],
                        context) -> torch.Tensor:
    """Logits after the last of ``ids`` ([b, s], at ``positions`` [s], the cache's offset on),
    ``mask`` [b, 1, s, keys] True where a key is hidden (None: causal); the keys and values of
    ``ids`` are added to the cache."""
    with model.forward_only():
        logits = model(ids, positions.to(ids.device).expand_as(ids), mask, inference_context=context,
                       runtime_gather_output=True)
    context.increment_sequence_len_offset(ids.shape[1])
    return logits[:, -1]


def _generate_shared_offset(model, prompts: Sequence[Sequence[int]], active: list[int], run: _Run,
                            use_cache: bool) -> None:
    """Megatron-LM's static batching, for attention that takes no explicit mask (Transformer
    Engine's) and for the uncached path: all rows share one cache offset, the prefill runs up to
    the shortest prompt, and from there each step feeds every row its next token, the prompt's own
    while the row is still inside its prompt and the chosen one after. Finished rows are moved
    behind the others in the cache (``swap_key_value_dict``) and leave the batch."""
    rows = len(prompts)
    lengths = [len(p) for p in prompts]
    total = max(lengths[row] + run.limits[row] for row in active)
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
        # the rows past their prompt choose; the others are fed their prompt's token
        slots = [slot for slot, row in enumerate(active) if position >= lengths[row]]
        finished = []
        if slots:
            chosen, finished = run.choose(logits[slots], [active[slot] for slot in slots])
            for slot, token in zip(slots, chosen):
                tokens[active[slot], position] = token
        elif run.on_step is not None:
            run.on_step(0, 0)
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
                return
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
