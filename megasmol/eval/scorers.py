"""Log-likelihoods of continuations from a model: the Megatron-Core model of a megasmol checkpoint,
or a Hugging Face model through transformers. Both run the same batching loop.

Requests are sorted longest first and packed into batches of at most ``batch_tokens`` padded
tokens (choices of one question have similar lengths, so they share batches); sequences are
right-padded, which a causal model never attends to, and only the continuation positions get a
log-softmax. Results come back in request order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from megasmol.eval.requests import TokenRequest

Logits = Callable[[torch.Tensor], torch.Tensor]  # [batch, seq] ids -> [batch, seq, vocab] logits


class Scorer:
    """Computes ``sum log p(continuation | context)`` for token requests."""

    def __init__(self, logits: Logits, max_length: int, vocab_size: int, tokenizer, name: str,
                 batch_tokens: int = 8192):
        self.logits, self.max_length, self.tokenizer = logits, max_length, tokenizer
        self.vocab_size, self.name, self.batch_tokens = vocab_size, name, batch_tokens

    def loglikelihoods(self, requests: list[TokenRequest], progress=None) -> list[float]:
        from megasmol.config.typed import ConfigError

        largest = max((max(r.context + r.continuation) for r in requests), default=0)
        if largest >= self.vocab_size:
            raise ConfigError(f"{self.name}: the tokenizer produced id {largest}, beyond the model's "
                              f"vocabulary of {self.vocab_size}: wrong tokenizer?")
        windows = [r.window(self.max_length) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(windows[i][0]))
        results: list[Optional[float]] = [None] * len(requests)
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

    @torch.no_grad()
    def _score(self, windows: list[tuple[list[int], list[int]]], length: int) -> list[float]:
        ids = torch.zeros(len(windows), length, dtype=torch.long)
        for row, (tokens, _) in enumerate(windows):
            ids[row, :len(tokens)] = torch.tensor(tokens)
        logits = self.logits(ids)
        out = []
        for row, (tokens, continuation) in enumerate(windows):
            n = len(continuation)
            predicted = logits[row, len(tokens) - n:len(tokens)].float().log_softmax(-1)
            targets = torch.tensor(continuation).unsqueeze(-1)
            out.append(float(predicted.gather(-1, targets).sum()))
        return out


def megatron_scorer(checkpoint: str | Path, tokenizer, batch_tokens: int = 8192) -> Scorer:
    """The checkpoint's Megatron-Core model in one process (any layout that wrote it)."""
    from megasmol.model.load import load_checkpoint_model

    model, spec, _ = load_checkpoint_model(checkpoint)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        return model(ids, positions, None)

    return Scorer(logits, spec.max_position_embeddings, spec.vocab_size, tokenizer, str(checkpoint),
                  batch_tokens)


def hf_scorer(hf_dir: str | Path, tokenizer, batch_tokens: int = 8192,
              dtype: torch.dtype = torch.float32) -> Scorer:
    """A Hugging Face causal LM directory through transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    return Scorer(logits, model.config.max_position_embeddings, model.config.vocab_size, tokenizer,
                  str(hf_dir), batch_tokens)
