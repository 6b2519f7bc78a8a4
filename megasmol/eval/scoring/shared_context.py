"""Score the choices of a question against one pass over their shared context (a KV cache).

lm-evaluation-harness scores every (context, continuation) pair from scratch, so HellaSwag's four
endings, MMLU's four answers and every few-shot prompt pay for their context four times. Here the
requests that share their context tokens form a group; a batch of groups runs in two passes:

1. *prefill*: the contexts, left-padded to one length, with a KV cache. The hidden state at the
   last position (every row's last context token) predicts each continuation's first token.
2. *extend*: every continuation but its last token, right-padded (in chunks of similar lengths),
   against its group's cached keys and values (the cache rows repeated per continuation), at the
   positions that follow its context. Its hidden states predict the rest of the continuation.

The log-likelihoods are those of the whole sequence scored at once (tested within 1e-4 of
lm-eval's): left padding only shifts every position of a row by the same amount, which rotary
embeddings do not see (they depend on distances), and the padding is masked out. A one-token
continuation (an MCF letter) needs no second pass at all.

Two backends implement the passes: transformers' cache (``HFPrefix``) and Megatron-Core's
``StaticInferenceContext`` (``MegatronPrefix``: the single-process scorer, and the pipeline
scorer of the loop and torchrun where each data-parallel rank holds the whole model; not with
Transformer Engine's attention, which would not apply the padding masks:
``layer_specs.EXPLICIT_MASK_BACKENDS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megasmol.eval.scoring.log_probs import HEAD_POSITIONS
from megasmol.eval.scoring.requests import TokenRequest

WASTE = 1.25
"""Most padded tokens a pass may run per real token (prefill contexts, extension chunks)."""


class PrefixModel(Protocol):
    def prefill(self, ids: torch.Tensor, lengths: list[int], room: int):
        """``ids`` [B, P] left-padded contexts (``lengths`` real tokens each), room for ``room``
        more positions in the cache. Returns (hidden at the last position [B, h], cache)."""

    def extend(self, cache, rows: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """``ids`` [R, L] right-padded continuations, row r extending cache row ``rows[r]``.
        Returns hidden states [R, L, h]."""


@dataclass
class Group:
    context: tuple[int, ...]
    members: list[int]
    """Request indices whose context is ``context``."""


def shared_groups(requests: list[TokenRequest], max_length: int) -> tuple[list[Group], list[int]]:
    """Requests grouped by identical context (groups of two or more that fit the window) and the
    rest, which the plain path scores."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(requests):
        by_context.setdefault(request.context, []).append(index)
    groups, rest = [], []
    for context, members in by_context.items():
        fits = all(len(context) + len(requests[i].continuation) <= max_length + 1 for i in members)
        if len(members) > 1 and fits and context:
            groups.append(Group(context, members))
        else:
            rest += members
    return groups, rest


def _left_pad(rows: list[tuple[int, ...]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
    return ids


def _right_pad(rows: list[list[int]], width: int) -> torch.Tensor:
    ids = torch.zeros(len(rows), max(width, 1), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def score_shared(prefix: PrefixModel | None, pick, requests: list[TokenRequest], max_length: int,
                 batch_tokens: int, progress=None, rank: int = 0,
                 ranks: int = 1) -> tuple[dict[int, float], list[int]]:
    """The scoring path every scorer takes first: the requests that share a context, scored
    against one pass over it (this rank's ``rank::ranks`` share of the groups, whole questions
    each), and the indices of every request left to score whole (all of them without a
    ``prefix``: a model that cannot take the padding masks)."""
    if prefix is None:
        return {}, list(range(len(requests)))
    groups, rest = shared_groups(requests, max_length)
    return score_groups(prefix, groups[rank::ranks], requests, pick, batch_tokens, progress), rest


def score_groups(model: PrefixModel, groups: list[Group], requests: list[TokenRequest],
                 pick, batch_tokens: int, progress=None) -> dict[int, float]:
    """Log-likelihood per request index. ``pick(hidden [n, h], targets [n]) -> float64 [n]``
    applies the output layer and the log-softmax. Batches hold at most ``batch_tokens`` padded
    tokens over both passes, and contexts of similar lengths: a batch ends where left-padding its
    contexts to the longest would cost more than ``WASTE`` x their real tokens (0-shot HellaSwag's
    contexts range from 13 to 55+ tokens; one batch of all of them ran a third padding)."""
    groups = sorted(groups, key=lambda g: -len(g.context))
    picks = _Picks(pick, len(requests))
    start = 0
    while start < len(groups):
        width = len(groups[start].context)
        batch: list[Group] = []
        longest, used, real = 0, 0, 0
        for group in groups[start:]:
            tail = max(len(requests[i].continuation) for i in group.members) - 1
            cost = (len(batch) + 1) * width + (used + len(group.members)) * max(longest, tail, 1)
            padded = (len(batch) + 1) * width > WASTE * (real + len(group.context))
            if batch and (cost > batch_tokens or padded):
                break
            batch.append(group)
            longest, used = max(longest, tail), used + len(group.members)
            real += len(group.context)
        start += len(batch)
        _score_batch(model, batch, requests, picks, longest)
        if progress is not None:
            progress.update(sum(len(g.members) for g in batch))
    picks.flush(everything=True)
    members = [i for g in groups for i in g.members]
    return {i: float(picks.sums[i]) for i in members}


class _Picks:
    """Hidden states waiting for the output layer, applied in slices of ``HEAD_POSITIONS`` positions
    across passes and batches. The output layer streams its whole weight (hidden x 128k) per call,
    so a call on a few positions costs nearly as much as on hundreds; the small passes of
    similar-length batching must not each pay for it."""

    def __init__(self, pick, n: int):
        self.pick, self.sums = pick, torch.zeros(n, dtype=torch.float64)
        self.hidden: list[torch.Tensor] = []
        self.targets: list[int] = []
        self.owners: list[int] = []

    def add(self, hidden: torch.Tensor, targets: list[int], owners: list[int]) -> None:
        self.hidden.append(hidden)
        self.targets += targets
        self.owners += owners
        self.flush()

    def flush(self, everything: bool = False) -> None:
        ready = len(self.targets) if everything else len(self.targets) // HEAD_POSITIONS * HEAD_POSITIONS
        if not ready:
            return
        hidden = torch.cat(self.hidden)
        picked = self.pick(hidden[:ready], torch.tensor(self.targets[:ready]))
        self.sums.index_add_(0, torch.tensor(self.owners[:ready]), picked)
        self.hidden = [hidden[ready:]] if ready < len(self.targets) else []
        self.targets, self.owners = self.targets[ready:], self.owners[ready:]


def _score_batch(model: PrefixModel, batch: list[Group], requests, picks: _Picks, longest: int) -> None:
    contexts = [g.context for g in batch]
    last, cache = model.prefill(_left_pad(contexts), [len(c) for c in contexts], max(longest, 1))
    members = [(slot, i) for slot, g in enumerate(batch) for i in g.members]
    picks.add(last[torch.tensor([slot for slot, _ in members])],
              [requests[i].continuation[0] for _, i in members], [i for _, i in members])
    extending = sorted(((slot, i) for slot, i in members if len(requests[i].continuation) > 1),
                       key=lambda m: -len(requests[m[1]].continuation))
    for chunk in _similar_lengths(extending, requests):
        _extend_chunk(model, cache, chunk, requests, picks)


def _similar_lengths(extending: list, requests, waste: float = WASTE) -> list[list]:
    """Continuations longest first, cut where right-padding to the chunk's longest would cost more
    than ``waste`` x the chunk's real tokens (HellaSwag's endings range from a few to 60+ tokens)."""
    chunks: list[list] = []
    chunk: list = []
    real = 0
    for member in extending:
        n = len(requests[member[1]].continuation) - 1
        if chunk and (len(chunk) + 1) * (len(requests[chunk[0][1]].continuation) - 1) > waste * (real + n):
            chunks.append(chunk)
            chunk, real = [], 0
        chunk.append(member)
        real += n
    return chunks + ([chunk] if chunk else [])


def _extend_chunk(model: PrefixModel, cache, extending: list, requests, picks: _Picks) -> None:
    inputs = [list(requests[i].continuation[:-1]) for _, i in extending]
    hidden = model.extend(cache, torch.tensor([slot for slot, _ in extending]),
                          _right_pad(inputs, len(inputs[0])), [len(x) for x in inputs])
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    owners: list[int] = []
    for r, (_, i) in enumerate(extending):
        rest = requests[i].continuation[1:]
        rows += [r] * len(rest)
        cols += range(len(rest))
        targets += rest
        owners += [i] * len(rest)
    picks.add(hidden[torch.tensor(rows), torch.tensor(cols)], targets, owners)


class HFPrefix:
    """transformers: ``past_key_values`` from the prefill, its rows selected for the extension;
    a 2D attention mask hides the padding and explicit position ids put each row's tokens where
    they would be without it."""

    def __init__(self, trunk):
        self.trunk = trunk

    def prefill(self, ids, lengths, room):
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            mask[row, ids.shape[1] - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.trunk(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return out.last_hidden_state[:, -1], (out.cache, mask)

    def extend(self, cache, rows, ids, lengths):
        from transformers import DynamicCache

        past, mask = cache
        past = DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in past.layers])
        own = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            own[row, :n] = 1
        context_mask = mask[rows]
        positions = context_mask.sum(-1, keepdim=True) + torch.arange(ids.shape[1])
        out = self.trunk(input_ids=ids, attention_mask=torch.cat([context_mask, own], dim=1),
                         position_ids=positions, cache=past, use_cache=True)
        return out.last_hidden_state


class MegatronPrefix:
    """Megatron-Core: a ``StaticInferenceContext`` holds every layer's keys and values; the
    extension runs with the cache offset at the padded context length (all rows share it, as in
    Megatron's static batching) and an explicit mask ([b, 1, sq, sk], True = hidden)."""

    def __init__(self, model, hidden_of):
        self.model, self.hidden_of = model, hidden_of
        """``hidden_of(ids, positions, mask, context)`` -> hidden states [b, s, h]."""

    def prefill(self, ids, lengths, room):
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, width = ids.shape
        context = StaticInferenceContext(batch, width + room)
        context.materialize_only_last_token_logits = False
        keys = torch.arange(width)
        pad = keys[None, :] < (width - torch.tensor(lengths))[:, None]  # [B, P] left padding
        hidden_keys = (keys[None, :] > keys[:, None])[None] | pad[:, None, :]  # causal | padding
        hidden_keys &= ~torch.eye(width, dtype=torch.bool)[None]  # a pad row still sees itself
        hidden = self.hidden_of(ids, keys.expand_as(ids), hidden_keys[:, None], context)
        context.increment_sequence_len_offset(width)
        return hidden[:, -1], (context, pad, dict(context.key_value_memory_dict))

    def extend(self, cache, rows, ids, lengths):
        context, pad, prefilled = cache
        width, steps = pad.shape[1], ids.shape[1]
        for layer, (k, v) in prefilled.items():  # the prefill's rows, one per continuation,
            on = rows.to(k.device)  # as long as this extension needs (the cache has the batch's room)
            context.key_value_memory_dict[layer] = (k[:width + steps].index_select(1, on),
                                                    v[:width + steps].index_select(1, on))
        causal = torch.arange(steps)[None, :] > torch.arange(steps)[:, None]  # [L, L]
        hidden_keys = torch.cat([pad[rows][:, None, :].expand(-1, steps, -1),
                                 causal[None].expand(len(rows), -1, -1)], dim=2)
        positions = torch.arange(width, width + steps).expand_as(ids)
        return self.hidden_of(ids, positions, hidden_keys[:, None], context)
