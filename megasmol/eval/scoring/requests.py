"""Turning (context, continuation) text pairs into token ids, exactly as lm-evaluation-harness.

lm-eval's causal-LM convention (``TemplateLM._encode_pair``): trailing whitespace of the context
moves to the continuation; the whole string is encoded once and the continuation is what follows
the context's tokens, so a word boundary tokenizes as it would in running text. Encoding uses the
tokenizer's default special tokens (the Llama-3.2 tokenizer adds BOS). An empty context is the
prefix token (BOS, or EOS without one). Sequences longer than the model's window keep their
right end (the continuation) and lose tokens on the left.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenRequest:
    """One log-likelihood to compute: ``continuation`` given ``context`` (token ids)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def window(self, max_length: int) -> tuple[list[int], list[int]]:
        """Model input (the last ``max_length + 1`` tokens, final one dropped) and the
        continuation, which the input's last ``len(continuation)`` positions predict."""
        whole = list(self.context + self.continuation)[-(max_length + 1):]
        return whole[:-1], list(self.continuation)


def prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> TokenRequest:
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:
            return TokenRequest(tuple(cont[:1]), tuple(cont[1:]))
        return TokenRequest((prefix,), tuple(cont))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return TokenRequest(tuple(ctx), tuple(whole[len(ctx):]))


def check_vocabulary(requests: list[TokenRequest], vocab_size: int, name: str) -> None:
    """Every id the tokenizer produced exists in the model's vocabulary (else: wrong tokenizer)."""
    from megasmol.config.typed import ConfigError

    largest = max((max(r.context + r.continuation) for r in requests), default=0)
    if largest >= vocab_size:
        raise ConfigError(f"{name}: the tokenizer produced id {largest}, beyond the model's "
                          f"vocabulary of {vocab_size}: wrong tokenizer?")


@dataclass(frozen=True)
class GenerationRequest:
    """One greedy generation: ``prompt`` continued until the first of ``until`` (or EOS), at most
    ``max_new_tokens`` tokens."""

    prompt: str
    until: tuple[str, ...]
    max_new_tokens: int
    task: str = field(default="", compare=False)
    """The task it belongs to, for the progress bar."""

    def prompt_ids(self, tokenizer, max_length: int) -> list[int]:
        """The prompt's ids, cut on the left so that the generation fits in ``max_length``."""
        return tokenizer.encode(self.prompt)[-max(max_length - self.max_new_tokens, 1):]

    def stopped(self, tokenizer, new: list[int]) -> bool:
        """After ``new`` (the ids generated so far): EOS, a stop string, or the length limit."""
        return len(new) >= self.max_new_tokens or self._ended(tokenizer, new)

    def _ended(self, tokenizer, new: list[int]) -> bool:
        """EOS or a stop string at the end of ``new`` (checked after every token, so the last 16
        ids hold any stop string that just appeared)."""
        if new and new[-1] == tokenizer.eos_token_id:
            return True
        text = tokenizer.decode(new[-16:])
        return any(stop in text for stop in self.until)

    def text(self, tokenizer, new: list[int]) -> str:
        if new and new[-1] == tokenizer.eos_token_id:
            new = new[:-1]
        return tokenizer.decode(new, skip_special_tokens=True)

    def result(self, tokenizer, new: list[int]) -> Generation:
        truncated = len(new) >= self.max_new_tokens and not self._ended(tokenizer, new)
        return Generation(self.text(tokenizer, new), len(new), truncated)


@dataclass(frozen=True)
class Generation:
    """A finished greedy generation: its text (EOS dropped), how many ids were generated, and
    whether it was cut at ``max_new_tokens`` with no EOS or stop string (lm-eval users check how
    many were: a model that never stops spends the whole budget on every prompt)."""

    text: str
    tokens: int
    truncated: bool
