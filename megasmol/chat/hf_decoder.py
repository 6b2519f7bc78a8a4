"""``megasmol chat --hf DIR``: a Hugging Face model (an export, or any causal LM directory) behind
the same incremental-decoding interface as :class:`megasmol.decode.cached.Decoder`, so a chat session
talks to it exactly as to a checkpoint: transformers' KV cache, [1, vocab] logits out."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import torch


def _cache_argument(model) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` in transformers 5 (where
    ``past_key_values`` is a deprecated alias that logs a warning), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFDecoder:
    def __init__(self, model, max_length: int):
        from transformers import DynamicCache

        self.model, self.max_length = model, max_length
        # A Cache object the model fills in place (no legacy tuples, no deprecated names), so the
        # transcript shows only the conversation.
        try:
            self.cache = DynamicCache(config=model.config)
        except TypeError:  # transformers before 4.56 builds it without the config
            self.cache = DynamicCache()
        self.cache_argument = _cache_argument(model)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, use_cache=True, **{self.cache_argument: self.cache})
        return out.logits[:, -1]

    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """[1, n] prompt ids -> the [1, vocab] logits of the next token."""
        return self._forward(prompt)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` ([1, 1]) and return the logits that follow it."""
        return self._forward(token.view(1, 1))


def load_hf_chat_model(hf_dir: str | Path):
    """(model, the spec fields a chat session reads, tokenizer directory) for ``hf_dir``."""
    from megasmol.convert.hf_dir import check_hf_model_dir, load_hf_causal_lm

    model = load_hf_causal_lm(check_hf_model_dir(hf_dir))
    config = model.config
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    spec = SimpleNamespace(vocab_size=config.vocab_size, eos_token_id=eos,
                           max_position_embeddings=config.max_position_embeddings)
    return model, spec
