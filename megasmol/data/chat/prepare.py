"""``prepare-chat``: render conversations with a chat template into tokens plus a loss mask.

Output, beside each other (``PREFIX`` is ``--out``):

* ``PREFIX.bin/.idx`` -- one document per conversation (its tokens, then EOS), a Megatron-Core
  indexed dataset like ``prepare-data`` writes;
* ``PREFIX_lossmask.bin/.idx`` -- an aligned uint8 indexed dataset: 1 where the token is a
  target the loss covers (assistant text and the ``<|im_end|>`` closing each reply, or every
  token with ``--loss-on all``), so both are O(1) lookups through Megatron-Core's
  ``IndexedDataset``;
* ``PREFIX.tokenizer/`` -- the tokenizer the tokens were made with (chat markers as single
  tokens, the template as its ``chat_template``); runs on this data use it;
* ``PREFIX.chat.json`` -- what the files are (template, loss policy, counts); its presence is
  what makes the loader treat ``PREFIX`` as chat data.

Files are written under ``.partial`` names and renamed when complete, the token ``.idx`` last
(:mod:`megasmol.data.masked.publish`): a prefix with an ``.idx`` is whole, and a whole prefix
always has its mask and description.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.chat.records import Conversation, read_conversations, reason_hint
from megasmol.data.masked.descriptions import CHAT
from megasmol.data.masked.layout import tokenizer_path
from megasmol.data.masked.overflow import check_overflow, overflow_reason
from megasmol.data.masked.publish import MaskedDocuments, output_files
from megasmol.data.masked.summary import MaskedSummary
from megasmol.data.messages.template import ChatTemplate, TemplateRenderError, token_mask
from megasmol.data.readers import ReadIssues
from megasmol.utils.progress import progress_bar


def description_path(prefix: str | Path) -> Path:
    return CHAT.path(prefix)


def read_description(prefix: str | Path) -> Optional[dict]:
    """The ``.chat.json`` of a chat dataset, or None for plain token data."""
    return CHAT.read(prefix)


@dataclass
class ChatSummary(MaskedSummary):
    """What ``prepare-chat`` wrote, and what it left out and why."""

    loss_on: str = "assistant"
    """assistant or all (``--loss-on``)."""
    conversations: int = 0
    longest: int = 0
    """The longest conversation's tokens."""
    format: str = CHAT.format

    def rows(self) -> list[tuple[str, str]]:
        rows = [("template", f"{self.template} (loss on {self.loss_on})"),
                ("conversations", f"{self.conversations:,} (longest {self.longest:,} tokens)"),
                self.tokens_row(),
                ("supervised", f"{self.supervised_tokens:,} ({self.share_text()})"),
                self.time_row()]
        if self.truncated:
            rows.append(("truncated", f"{self.truncated:,} (to --max-length)"))
        return rows


def _encoded(conversations: Iterator[Conversation], template: ChatTemplate, tokenizer, issues: ReadIssues,
             batch: int = 256):
    """(conversation, token ids, offsets, spans) for every conversation the template renders."""
    pending: list[tuple[Conversation, object]] = []

    def flush():
        if not pending:
            return []
        enc = tokenizer([r.text for _, r in pending], add_special_tokens=False,
                        return_offsets_mapping=True)
        out = [(c, ids, offs, r.spans) for (c, r), ids, offs
               in zip(pending, enc["input_ids"], enc["offset_mapping"])]
        pending.clear()
        return out

    for conversation in conversations:
        try:
            rendered = template.render(conversation.messages, tools=conversation.tools, **conversation.kwargs)
        except TemplateRenderError:
            issues.add("template_error", conversation.where)
            continue
        pending.append((conversation, rendered))
        if len(pending) >= batch:
            yield from flush()
    yield from flush()


def prepare_chat(inputs: list[str], out_prefix: str, *, template: str = "smollm3",
                 tokenizer: Optional[str] = None, max_length: Optional[int] = None,
                 on_overflow: Literal["error", "truncate", "drop"] = "error",
                 loss_on: Literal["assistant", "all"] = "assistant", messages_key: str = "messages",
                 split: str = "train", overwrite: bool = False, show_progress: bool = True,
                 now=None) -> ChatSummary:
    from megasmol.data.messages.special_tokens import open_chat_tokenizer
    from megasmol.data.tokenize import choose_dtype
    from megasmol.tokenizer import default_tokenizer_dir

    if loss_on not in ("assistant", "all"):
        raise ConfigError(f"--loss-on must be assistant or all, got {loss_on!r}")
    check_overflow(on_overflow)
    if max_length is not None and max_length < 2:
        raise ConfigError(f"--max-length must be >= 2, got {max_length}")
    source = tokenizer or default_tokenizer_dir()
    prefix, partial = output_files(out_prefix, CHAT.path(out_prefix), overwrite)
    chat_tokenizer, chosen, eos_id = open_chat_tokenizer(
        source, partial[tokenizer_path(prefix)], template, now,
        need_marks=loss_on == "assistant", why="an assistant-only loss mask",
        otherwise="mark the replies in the template or use --loss-on all")
    summary = ChatSummary(str(prefix), chosen.name, str(source), int(eos_id), loss_on=loss_on)
    issues = ReadIssues()
    start = time.perf_counter()
    with MaskedDocuments(prefix, partial, choose_dtype("auto", len(chat_tokenizer))) as out:
        with progress_bar(None, "prepare-chat", enabled=show_progress, unit="conv") as bar:
            stream = _encoded(read_conversations(inputs, issues, messages_key=messages_key, split=split),
                              chosen, chat_tokenizer, issues)
            for conversation, ids, offsets, spans in stream:
                bar.update(1)
                mask = (np.ones(len(ids), np.uint8) if loss_on == "all" else token_mask(offsets, spans))
                ids = np.append(np.asarray(ids, dtype=np.int64), eos_id)
                mask = np.append(mask, np.uint8(1 if loss_on == "all" else 0))
                if max_length is not None and len(ids) > max_length:
                    if on_overflow == "truncate":
                        ids, mask = ids[:max_length], mask[:max_length]
                        summary.truncated += 1
                    else:
                        issues.add(overflow_reason(on_overflow), conversation.where)
                        continue
                if not mask.any():
                    issues.add("no_assistant_tokens", conversation.where)
                    continue
                out.add(ids, mask, [len(ids)])
                summary.conversations += 1
                summary.tokens += len(ids)
                summary.supervised_tokens += int(mask.sum())
                summary.longest = max(summary.longest, len(ids))
        out.publish(summary, issues, summary.conversations, "prepare-chat: no usable conversation",
                    CHAT.path(prefix), start, hint=reason_hint(issues.counts))
    return summary
