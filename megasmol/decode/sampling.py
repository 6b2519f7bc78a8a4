"""How the next token is chosen from the logits: greedy, or sampled at a temperature from the
``top_k`` / ``top_p`` restriction of the distribution, with one ``torch.Generator`` per row.

``choose`` returns the chosen tokens and their log-probabilities under the model's distribution
at that temperature, ``log_softmax(logits / T)[token]`` (``T = 1`` when greedy): the quantity a
trainer recomputes from the same logits (as TRL's ``GRPOTrainer`` does). ``top_k`` and ``top_p``
only restrict which tokens may be drawn, they do not change the log-probability, and they apply in
transformers' and vLLM's order: the ``top_k`` largest logits first, then the smallest set of
those whose probability (renormalized over them) reaches ``top_p``.

A sampled row draws exactly one uniform number from its own generator per token (inverse
transform over the restricted distribution in vocabulary order: ``draw``) and a greedy row draws
none, so a row's tokens depend only on its logits and its generator: not on the other rows in the
batch, the data-parallel split or the tensor-parallel layout (where every rank holds the whole
vocabulary's logits of the rows it samples and chooses the same token). One ``exp`` over the
vocabulary gives everything (float32): with ``z = x - max(x)`` for the scaled logits ``x`` and
``w = exp(z)``, the log-probabilities are ``z - log(sum w)``, the entropy ``log(sum w) - sum(w z) /
sum w``, and the draw runs over ``w`` itself (the probabilities times ``sum w``): summed by blocks
of 256 (in float32) whose sums are cumulated in float64, then cumulated in float64 within the one
block the number falls in, a few short passes rather than a float64 softmax and cumulative sum of
the whole vocabulary. The distribution is the float32 weights'; the tokens equal those of one
float64 cumulative sum over the vocabulary except
where the number falls within float32 rounding of a boundary between two tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch

from megasmol.config.typed import ConfigError


@dataclass
class SamplingParams:
    """The rule that picks each next token (the same for every row of a batch)."""

    temperature: float = 0.0
    """0: greedy (the argmax; log-probabilities at temperature 1); above 0: sample from
    ``softmax(logits / temperature)`` restricted by ``top_k`` and ``top_p``."""
    top_p: float = 1.0
    """Nucleus sampling: draw only from the smallest set of tokens (most likely first) whose
    probability reaches ``top_p``; 1 keeps every token."""
    top_k: int = 0
    """Draw only from the ``top_k`` most likely tokens (ties at the k-th logit kept); 0: off."""

    def validate(self) -> None:
        if not self.temperature >= 0:  # NaN fails too
            raise ConfigError(f"sampling temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"sampling top_k must be an integer >= 0 (0: off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, ``torch.Generator().manual_seed(seed)``."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


class UniformStreams:
    """Each row's numbers from its generator, ``CHUNK`` at a time: the numbers, in their order,
    that one ``torch.rand((), dtype=torch.float64, generator=g)`` per token gives (torch's CPU
    ``uniform_`` fills a tensor serially; tested), for a fraction of the calls. The generators'
    states run ahead by the unused rest of a chunk: hand each generator to one stream only."""

    CHUNK = 64

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = generators
        self.buffers: list[list[float]] = [[] for _ in generators]
        self.used = [0] * len(generators)

    def next(self, rows: Sequence[int]) -> list[float]:
        """The next number of each of ``rows`` (indices into the generators)."""
        out = []
        for row in rows:
            used, buffer = self.used[row], self.buffers[row]
            if used == len(buffer):
                buffer = torch.rand(self.CHUNK, dtype=torch.float64, generator=self.generators[row]).tolist()
                self.buffers[row], used = buffer, 0
            out.append(buffer[used])
            self.used[row] = used + 1
        return out


def _scaled(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits.float() / T`` (T = 1 when greedy; no divide at T = 1)."""
    logits = logits.float()
    return logits if params.temperature in (0, 1) else logits / params.temperature


def log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[rows, vocab] -> ``log_softmax(logits.float() / T)`` (T = 1 when greedy), the distribution
    whose log-probabilities ``choose`` reports. Computed as ``z - log(sum(exp(z)))`` with ``z = x -
    max(x)``, as ``choose`` does: on CPU, torch's fp32 ``log_softmax`` over a 128k vocabulary is off
    by up to about 5e-4 per row (a constant offset), where this agrees with float64 and with the
    trainer's cross-entropy (Megatron-Core's ``vocab_parallel_cross_entropy``) to about 1e-6, which
    RL's on-policy check needs."""
    shifted, _, total = _normalizer(_scaled(logits, params))
    return shifted - total.log()


def _normalizer(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, vocab] -> ``z = scaled - max`` (at most 0, 0 at the largest), ``w = exp(z)`` and
    ``total = sum(w)`` ([rows, 1]): the log-probabilities are ``z - log(total)`` and the
    probabilities ``w / total``, from one ``exp`` over the vocabulary."""
    shifted = scaled - scaled.amax(dim=-1, keepdim=True)
    weights = shifted.exp()
    return shifted, weights, weights.sum(dim=-1, keepdim=True)


def outside(scaled: torch.Tensor, top_k: int, top_p: float) -> Optional[torch.Tensor]:
    """[rows, vocab] temperature-scaled logits (any shift) -> True at every token outside the
    ``top_k`` / ``top_p`` set (top_k first, then top_p over what it kept); None when neither
    restricts."""
    hidden = None
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        hidden = scaled < kth
        scaled = scaled.masked_fill(hidden, float("-inf"))
    if top_p < 1:
        probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True, dim=-1)
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p  # the most likely token always stays
        dropped = drop.scatter(-1, order, drop)
        hidden = dropped if hidden is None else hidden | dropped
    return hidden


class Choice(NamedTuple):
    """What :func:`choose_scored` picks for each row, with the distribution's measures."""

    tokens: torch.Tensor
    """[rows] the chosen ids."""
    log_probs: torch.Tensor
    """[rows] float32 ``log_softmax(logits / T)[token]``."""
    entropies: torch.Tensor
    """[rows] float32 entropy (nats) of ``softmax(logits / T)``, the whole vocabulary (before
    ``top_k`` / ``top_p``): TRL's per-token ``entropy`` (``trl.trainer.utils.entropy_from_logits``
    of the logits divided by the temperature)."""


BLOCK = 256
"""Vocabulary entries per block of ``draw``'s two-level cumulative sum."""


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] probabilities (any scale; 0 outside the allowed set) and [rows] numbers in
    [0, 1) -> [rows] the first token whose cumulative probability (in vocabulary order, float64)
    exceeds ``uniform`` x the row's total: the inverse transform. Never a token of probability 0.

    Past the block sums (one torch pass over the vocabulary), a CPU tensor's draw runs in numpy
    on [rows, blocks] and [rows, BLOCK] arrays: the same float64 sums in the same order as
    :func:`_draw_torch` (the same tokens, tested), without its few dozen small torch calls."""
    if probs.device.type != "cpu":
        return _draw_torch(probs, uniform)
    rows, vocab = probs.shape
    blocks_n = -(-vocab // BLOCK)
    p = probs if vocab == blocks_n * BLOCK else torch.nn.functional.pad(probs, (0, blocks_n * BLOCK - vocab))
    blocks = p.contiguous().view(rows, blocks_n, BLOCK)
    ends = np.cumsum(blocks.sum(-1).numpy().astype(np.float64), axis=1)  # see _draw_torch
    total = ends[:, -1]
    target = np.minimum(np.asarray(uniform, dtype=np.float64) * total, np.nextafter(total, 0.0))
    # searchsorted(right=True) over nondecreasing sums: how many are <= the target
    block = np.minimum((ends <= target[:, None]).sum(1), blocks_n - 1)
    each = np.arange(rows)
    before = np.where(block > 0, ends[each, np.maximum(block - 1, 0)], 0.0)
    inside = blocks.numpy()[each, block]  # [rows, BLOCK]
    index = (before[:, None] + np.cumsum(inside.astype(np.float64), axis=1) <= target[:, None]).sum(1)
    last = BLOCK - 1 - (inside > 0)[:, ::-1].argmax(1)  # see _draw_torch
    return torch.from_numpy(block * BLOCK + np.minimum(index, last)).to(torch.long)


def _draw_torch(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """:func:`draw` in torch calls, on any device."""
    rows, vocab = probs.shape
    blocks_n = -(-vocab // BLOCK)
    p = probs if vocab == blocks_n * BLOCK else torch.nn.functional.pad(probs, (0, blocks_n * BLOCK - vocab))
    blocks = p.view(rows, blocks_n, BLOCK)
    # [rows, blocks] the cumulative sum at each block's end: each block's 256 terms summed in the
    # probabilities' float32 (a float64 copy of the whole vocabulary cost 8% of a decoding step),
    # the blocks cumulated in float64
    ends = blocks.sum(-1).double().cumsum(-1)
    total = ends[:, -1:]
    target = torch.minimum(uniform.to(p.device, torch.float64).unsqueeze(-1) * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(ends, target, right=True).clamp(max=blocks_n - 1)  # [rows, 1]
    before = torch.where(block > 0, ends.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inside = blocks.gather(1, block.unsqueeze(-1).expand(-1, -1, BLOCK)).squeeze(1)  # [rows, BLOCK]
    index = torch.searchsorted(before + inside.double().cumsum(-1), target, right=True).squeeze(-1)
    # The block's end was summed in another order: past its last token of positive probability
    # by rounding, the draw takes that token (a zero's cumulative sum equals the one before it).
    last = BLOCK - 1 - (inside > 0).flip(-1).int().argmax(-1)
    return block.squeeze(-1) * BLOCK + torch.minimum(index, last)


def choose(logits: torch.Tensor, params: SamplingParams,
           generators: Optional[Sequence[torch.Generator]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, vocab] logits -> ([rows] token ids, [rows] float32 log-probabilities of them,
    ``log_softmax(logits / T)[token]``). Greedy needs no generators (the lowest id on a tie, as
    ``argmax``); sampling takes one per row and draws one number from each."""
    choice = choose_scored(logits, params, generators, with_entropy=False)
    return choice.tokens, choice.log_probs


def choose_scored(logits: torch.Tensor, params: SamplingParams,
                  generators: Optional[Sequence[torch.Generator]] = None,
                  with_entropy: bool = True, uniform: Optional[Sequence[float]] = None) -> Choice:
    """:func:`choose`, with each row's entropy (zeros when not ``with_entropy``). ``uniform``:
    each sampled row's number, already drawn from its generator (:class:`UniformStreams`),
    instead of ``generators``.

    One ``exp`` over the vocabulary serves all three: with ``z = x - max(x)`` and ``w = exp(z)``
    (``x`` the scaled logits), the log-probabilities are ``z - log(sum w)``, the draw takes ``w``
    as it is (the inverse transform needs no normalized probabilities) and the entropy is
    ``log(sum w) - sum(w z) / sum w``."""
    scaled = _scaled(logits, params)
    if params.greedy:
        tokens = scaled.argmax(dim=-1)  # the logits' own argmax (no rounding in between)
    elif uniform is not None:
        if len(uniform) != logits.shape[0]:
            raise ValueError(f"sampling {logits.shape[0]} row(s) needs one number per row, "
                             f"got {len(uniform)}")
    elif generators is None or len(generators) != logits.shape[0]:
        raise ValueError(f"sampling {logits.shape[0]} row(s) needs one generator per row, got "
                         f"{None if generators is None else len(generators)}")
    shifted, weights, total = _normalizer(scaled)
    if not params.greedy:
        hidden = outside(shifted, params.top_k, params.top_p)
        allowed = weights if hidden is None else weights.masked_fill(hidden, 0.0)
        if uniform is None:
            assert generators is not None
            uniform = [torch.rand((), dtype=torch.float64, generator=g).item() for g in generators]
        tokens = draw(allowed, torch.tensor(uniform, dtype=torch.float64))
    log_total = total.log()
    chosen = shifted.gather(-1, tokens.unsqueeze(-1)).sub_(log_total).squeeze(-1)
    if not with_entropy:
        return Choice(tokens, chosen, torch.zeros_like(chosen))
    # sum(w z) / sum(w): the mean of z; 0 x -inf (a token of probability 0) is NaN, left out.
    # In place: the draw is done with the weights.
    mean_shift = weights.mul_(shifted).nansum(-1, keepdim=True) / total
    return Choice(tokens, chosen, (log_total - mean_shift).squeeze(-1))
