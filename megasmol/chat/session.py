"""A chat session with a Megatron checkpoint: the conversation is rendered with the model's chat
template (the one stored with its tokenizer by ``prepare-chat``, or ``--template``), the reply is
decoded with the KV cache until the end-of-turn token, and the turn joins the history."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megasmol.config.typed import ConfigError
from megasmol.decode.sampling import SamplingParams, choose


class ChatSession:
    def __init__(self, model, spec, tokenizer, template, *, system: Optional[str] = None,
                 think: Optional[bool] = None, max_new_tokens: int = 256,
                 sampling: Optional[SamplingParams] = None, seed: Optional[int] = None,
                 decoder=None):
        """``decoder(model, max_length)``: incremental decoding (Megatron-Core's by default;
        :class:`megasmol.chat.hf_decoder.HFDecoder` for a transformers model). ``seed``: the
        sampling generator's (the whole session draws from one; None: one drawn from torch's
        global generator)."""
        from megasmol.data.messages.special_tokens import single_token_id
        from megasmol.decode.cached import Decoder

        self.model, self.spec, self.tokenizer, self.template = model, spec, tokenizer, template
        self.decoder = decoder or Decoder
        self.think, self.max_new_tokens = think, max_new_tokens
        self.sampling = sampling or SamplingParams()
        self.sampling.validate()
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        self.generator = torch.Generator().manual_seed(seed)
        end_of_turn = single_token_id(tokenizer, "<|im_end|>")
        self.stop_ids = {i for i in (end_of_turn, spec.eos_token_id) if i is not None}
        self.system = system
        self.reset()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, tokenizer: Optional[str] = None,
                        template: Optional[str] = None, **kwargs) -> ChatSession:
        from megasmol.ckpt.checkpoint import tokenizer_dir
        from megasmol.model.load import load_checkpoint_model
        from megasmol.tokenizer import load_tokenizer

        source = tokenizer or tokenizer_dir(checkpoint)
        if source is None:
            raise ConfigError(f"{checkpoint}: no tokenizer stored with it; pass --tokenizer DIR")
        hf_tokenizer = load_tokenizer(source)
        chosen = _template(hf_tokenizer, template, "checkpoint",
                           f"{checkpoint}: its tokenizer has no chat template (it was not trained on "
                           "prepare-chat data); pass --template smollm3|chatml|FILE")
        model, spec, _ = load_checkpoint_model(checkpoint)
        return cls(model, spec, hf_tokenizer, chosen, **kwargs)

    @classmethod
    def from_hf(cls, hf_dir: str | Path, *, tokenizer: Optional[str] = None,
                template: Optional[str] = None, **kwargs) -> ChatSession:
        """A Hugging Face model directory (``megasmol export-hf --chat-template ...``, or any)."""
        from megasmol.chat.hf_decoder import HFDecoder, load_hf_chat_model
        from megasmol.tokenizer import load_tokenizer

        model, spec = load_hf_chat_model(hf_dir)
        hf_tokenizer = load_tokenizer(tokenizer or hf_dir)
        chosen = _template(hf_tokenizer, template, "model",
                           f"{hf_dir}: its tokenizer has no chat template (export with "
                           "--chat-template, or pass --template smollm3|chatml|FILE)")
        return cls(model, spec, hf_tokenizer, chosen, decoder=HFDecoder, **kwargs)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> torch.Tensor:
        kwargs = {} if self.think is None else {"enable_thinking": self.think}
        text = self.template.render(self.messages, add_generation_prompt=True, **kwargs).text
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] + self.max_new_tokens > self.spec.max_position_embeddings:
            raise ConfigError(f"the conversation ({ids.shape[1]} tokens) plus --max-new-tokens "
                              f"exceeds the model's {self.spec.max_position_embeddings} positions; "
                              "/reset or shorten it")
        if int(ids.max()) >= self.spec.vocab_size:
            raise ConfigError(f"the tokenizer gave id {int(ids.max())}, beyond the model's vocabulary of "
                              f"{self.spec.vocab_size}: wrong tokenizer? (--tokenizer)")
        return ids

    @torch.no_grad()
    def generate(self, ids: torch.Tensor) -> list[int]:
        """New token ids after ``ids`` up to and excluding the end-of-turn token."""
        decoder = self.decoder(self.model, ids.shape[1] + self.max_new_tokens)
        logits = decoder.start(ids)
        new: list[int] = []
        for index in range(self.max_new_tokens):
            tokens, _ = choose(logits, self.sampling, [self.generator])
            token = int(tokens[0])
            if token in self.stop_ids:
                break
            new.append(token)
            if index < self.max_new_tokens - 1:
                logits = decoder.step(tokens.view(1, 1).to(ids.device))
        return new

    def reply(self, message: str) -> str:
        """Add the user's ``message``, generate the assistant's answer, keep both in the history."""
        self.messages.append({"role": "user", "content": message})
        new = self.generate(self.prompt_ids())
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        self.messages.append({"role": "assistant", "content": text})
        return text


def _template(tokenizer, choice: Optional[str], owner: str, missing: str):
    """``choice`` (a name or file) when given, else the tokenizer's own template; ``missing`` is
    the error when it has none."""
    from megasmol.data.messages.template import ChatTemplate, load_template

    if choice is not None:
        return load_template(choice, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplate(tokenizer.chat_template, owner)
    raise ConfigError(missing)
