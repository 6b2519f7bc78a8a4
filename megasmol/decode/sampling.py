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
    exceeds ``uniform`` x the row's total: the inverse transform. Never a token of probability 0."""
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
                  with_entropy: bool = True) -> Choice:
    """:func:`choose`, with each row's entropy (zeros when not ``with_entropy``).

    One ``exp`` over the vocabulary serves all three: with ``z = x - max(x)`` and ``w = exp(z)``
    (``x`` the scaled logits), the log-probabilities are ``z - log(sum w)``, the draw takes ``w``
    as it is (the inverse transform needs no normalized probabilities) and the entropy is
    ``log(sum w) - sum(w z) / sum w``."""
    scaled = _scaled(logits, params)
    if params.greedy:
        tokens = scaled.argmax(dim=-1)  # the logits' own argmax (no rounding in between)
    elif generators is None or len(generators) != logits.shape[0]:
        raise ValueError(f"sampling {logits.shape[0]} row(s) needs one generator per row, got "
                         f"{None if generators is None else len(generators)}")
    shifted, weights, total = _normalizer(scaled)
    if not params.greedy:
        hidden = outside(shifted, params.top_k, params.top_p)
        allowed = weights if hidden is None else weights.masked_fill(hidden, 0.0)
        uniform = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in generators])
        tokens = draw(allowed, uniform)
    log_total = total.log()
    chosen = shifted.gather(-1, tokens.unsqueeze(-1)).sub_(log_total).squeeze(-1)
    if not with_entropy:
        return Choice(tokens, chosen, torch.zeros_like(chosen))
    # sum(w z) / sum(w): the mean of z; 0 x -inf (a token of probability 0) is NaN, left out
    mean_shift = (weights * shifted).nansum(-1, keepdim=True) / total
    return Choice(tokens, chosen, (log_total - mean_shift).squeeze(-1))
