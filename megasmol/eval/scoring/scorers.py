"""Log-likelihoods of continuations from a model: the Megatron-Core model of a megasmol checkpoint,
or a Hugging Face model through transformers. Both run the same batching loop.

Requests are sorted longest first and packed into batches of at most ``batch_tokens`` padded
tokens (choices of one question have similar lengths, so they share batches); sequences are
right-padded, which a causal model never attends to. The transformer runs over every position,
but the output layer (hidden x vocabulary, the largest matmul of a small model with a 128k
vocabulary) and the log-softmax only over the continuation positions, in slices written into one
reused buffer (a fresh 128 MB of logits per slice cost more in page faults than in arithmetic on
a CPU). Results come back in request order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from megasmol.eval.scoring.gen_progress import GenerationProgress
from megasmol.eval.scoring.log_probs import LinearInto, LogProbs
from megasmol.eval.scoring.requests import Generation, GenerationRequest, TokenRequest, check_vocabulary
from megasmol.eval.scoring.shared_context import HFPrefix, MegatronPrefix, score_shared

Hidden = Callable[[torch.Tensor], torch.Tensor]  # [batch, seq] ids -> [batch, seq, hidden]


Generator = Callable[[list[list[int]], list[GenerationRequest], Callable[[int, int], None]],
                     list[list[int]]]
"""Greedy new ids for a batch of prompts (as ids) whose requests share their stop strings and
length limit; the third argument hears of each decoding step (ids generated, rows finished)."""


class ProcessScorer:
    """Computes ``sum log p(continuation | context)`` for token requests, and greedy generations
    with a batched ``generator``, with the whole model in this process (``api.Scorer``)."""

    def __init__(self, *, hidden: Hidden, head: LinearInto, max_length: int, vocab_size: int,
                 tokenizer, name: str, batch_tokens: int = 8192,
                 generator: Optional[Generator] = None, prefix=None):
        self.generator = generator
        self.prefix = prefix
        """A ``shared_context.PrefixModel``: requests that share their context score it once."""
        self.hidden, self.max_length, self.tokenizer = hidden, max_length, tokenizer
        self.vocab_size, self.name, self.batch_tokens = vocab_size, name, batch_tokens
        self.log_probs = LogProbs(head)

    def loglikelihoods(self, requests: list[TokenRequest], progress=None) -> list[float]:
        check_vocabulary(requests, self.vocab_size, self.name)
        results: list[Optional[float]] = [None] * len(requests)
        with torch.no_grad():
            found, plain = score_shared(self.prefix, self.log_probs, requests, self.max_length,
                                        self.batch_tokens, progress)
        for index, value in found.items():
            results[index] = value
        windows = {i: requests[i].window(self.max_length) for i in plain}
        order = sorted(plain, key=lambda i: -len(windows[i][0]))
        start = 0
        while start < len(order):
            longest = len(windows[order[start]][0])
            size = max(1, self.batch_tokens // max(longest, 1))
            batch = order[start:start + size]
            for index, value in zip(batch, self._score([windows[i] for i in batch], longest)):
                results[index] = value
            if progress is not None:
                progress.update(len(batch))
            start += len(batch)
        return results  # type: ignore[return-value]

    def generations(self, requests: list[GenerationRequest], progress=None) -> list[Generation]:
        """The greedy generation after each prompt (its text, token count, and whether the
        length limit cut it). Requests with the same stopping rules are decoded together, longest
        prompt first, at most ``batch_tokens`` prompt-and-new tokens a batch (similar lengths
        share a batch, so little of it is spent feeding the longer prompts).
        ``progress``: a ``gen_progress.GenerationProgress``, told of every decoding step."""
        progress = progress if progress is not None else GenerationProgress()
        prompts = [r.prompt_ids(self.tokenizer, self.max_length) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.until, request.max_new_tokens), []).append(index)
        results: list[Optional[Generation]] = [None] * len(requests)
        for (_, max_new), group in groups.items():
            group.sort(key=lambda i: -len(prompts[i]))
            progress.task(", ".join(dict.fromkeys(requests[i].task for i in group)))
            start = 0
            while start < len(group):
                size = max(1, self.batch_tokens // (len(prompts[group[start]]) + max_new))
                batch = group[start:start + size]
                finished = progress.prompts
                if self.generator is None:
                    raise TypeError(f"scorer {self.name} was built without a generator")
                new = self.generator([prompts[i] for i in batch], [requests[i] for i in batch],
                                     progress.step)
                truncated = 0
                for index, ids in zip(batch, new, strict=True):
                    generation = requests[index].result(self.tokenizer, ids)
                    results[index] = generation
                    truncated += generation.truncated
                # Rows the generator did not report as finished (transformers reports none).
                progress.done(len(batch) - (progress.prompts - finished), truncated)
                start += len(batch)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score(self, windows: list[tuple[list[int], list[int]]], length: int) -> list[float]:
        ids = torch.zeros(len(windows), length, dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        owner: list[int] = []
        for row, (tokens, continuation) in enumerate(windows):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            n = len(continuation)
            rows += [row] * n
            cols += range(len(tokens) - n, len(tokens))
            targets += continuation
            owner += [row] * n
        hidden = self.hidden(ids)[torch.tensor(rows), torch.tensor(cols)]
        picked = self.log_probs(hidden, torch.tensor(targets))
        sums = torch.zeros(len(windows), dtype=torch.float64).index_add_(0, torch.tensor(owner), picked)
        return sums.tolist()


@contextlib.contextmanager
def _hidden_states_out(model):
    """GPTModel returns its last hidden states instead of logits while this is active (its output
    layer passes them through); the real output layer is yielded, to apply where needed."""
    layer = model.output_layer
    original = layer.forward
    layer.forward = lambda hidden, weight=None, runtime_gather_output=None: (hidden, None)
    try:
        yield original
    finally:
        del layer.forward


def megatron_head(model) -> LinearInto:
    """The output layer of a Megatron-Core model held whole by one process (TP 1, no bias): one
    matmul, without the tensor-parallel layer's autograd function around it."""
    weight = (model.shared_embedding_or_output_weight()
              if model.share_embeddings_and_output_weights else model.output_layer.weight)
    return LinearInto(weight)


def megatron_prefix(model):
    """``shared_context.MegatronPrefix`` on a Megatron-Core model held whole by one process; None
    where its attention backend would not apply the padding masks the prefix passes need (then
    each pair is scored whole)."""
    from megasmol.model.layer_specs import EXPLICIT_MASK_BACKENDS

    if model.attention_backend not in EXPLICIT_MASK_BACKENDS:
        return None

    device = next(model.parameters()).device  # requests are built on the CPU

    def hidden_of(ids, positions, mask, context):
        with _hidden_states_out(model), model.forward_only():
            return model(ids.to(device), positions.to(device), mask.to(device),
                         inference_context=context, runtime_gather_output=True)

    return MegatronPrefix(model, hidden_of)


def megatron_scorer(checkpoint: str | Path, tokenizer, batch_tokens: int = 8192) -> ProcessScorer:
    """The checkpoint's Megatron-Core model in one process (any layout that wrote it)."""
    from megasmol.model.load import load_checkpoint_model

    model, spec, _ = load_checkpoint_model(checkpoint)
    # Requests are built on the CPU; the model may live on a GPU (built on the current device).
    device = next(model.parameters()).device

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
        with _hidden_states_out(model), model.forward_only():
            return model(ids, positions, None)

    def generator(prompts: list[list[int]], requests: list[GenerationRequest],
                  on_step=None) -> list[list[int]]:
        from megasmol.decode.cached import generate

        done = generate(model, prompts, [r.max_new_tokens for r in requests],
                        eos_token_id=tokenizer.eos_token_id,
                        stop=lambda row, new: requests[row].stopped(tokenizer, new), on_step=on_step)
        return [completion.tokens for completion in done]

    return ProcessScorer(hidden=hidden, head=megatron_head(model),
                         max_length=spec.max_position_embeddings, vocab_size=spec.vocab_size,
                         tokenizer=tokenizer, name=str(checkpoint), batch_tokens=batch_tokens,
                         generator=generator, prefix=megatron_prefix(model))


class _StepCounter:
    """A transformers streamer that reports each decoding step's tokens: those of rows that have
    not yet written EOS (a finished row is padded with EOS), EOS itself not counted."""

    def __init__(self, eos: int, on_step: Callable[[int, int], None]):
        self.eos, self.on_step = eos, on_step
        self.ended: Optional[torch.Tensor] = None
        """Each row has written EOS (set by the prompts, streamed first)."""

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 2:  # the prompts, streamed first
            self.ended = torch.zeros(value.shape[0], dtype=torch.bool)
            return
        is_eos = value == self.eos
        if self.ended is None:
            raise TypeError("the streamer was sent a step before the prompts")
        self.on_step(int((~self.ended & ~is_eos).sum()), 0)
        self.ended |= is_eos

    def end(self) -> None:
        pass


def hf_scorer(hf_dir: str | Path, tokenizer, batch_tokens: int = 8192,
              dtype: torch.dtype = torch.float32) -> ProcessScorer:
    """A Hugging Face causal LM directory through transformers."""
    from megasmol.convert.hf_dir import load_hf_causal_lm

    model = load_hf_causal_lm(hf_dir, dtype)
    trunk, output = model.base_model, model.get_output_embeddings()
    head = LinearInto(output.weight, getattr(output, "bias", None))

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        return trunk(input_ids=ids).last_hidden_state

    def generator(prompts: list[list[int]], requests: list[GenerationRequest],
                  on_step=None) -> list[list[int]]:
        # Left-padded, as transformers batches generation; the mask keeps the padding unseen and
        # sets the position ids. Finished rows are filled with EOS, cut off here (transformers
        # keeps them in the batch until the last row stops).
        eos, width = tokenizer.eos_token_id, max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=requests[0].max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos,
                                 stop_strings=list(requests[0].until), tokenizer=tokenizer,
                                 streamer=None if on_step is None else _StepCounter(eos, on_step))
        return [new[:new.index(eos)] if eos in new else new for new in out[:, width:].tolist()]

    return ProcessScorer(hidden=hidden, head=head, max_length=model.config.max_position_embeddings,
                         vocab_size=model.config.vocab_size, tokenizer=tokenizer, name=str(hf_dir),
                         batch_tokens=batch_tokens, generator=generator, prefix=HFPrefix(trunk))
