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

Files are written under ``.partial`` names and renamed when complete, the token ``.idx`` last:
a prefix with an ``.idx`` is whole, and a whole prefix always has its mask and description.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.chat.records import Conversation, read_conversations, reason_hint
from megasmol.data.chat.template import ChatTemplate, TemplateRenderError, load_template, token_mask
from megasmol.data.readers import ReadIssues
from megasmol.utils.progress import progress_bar

FORMAT = "megasmol-chat/1"
MASK_SUFFIX = "_lossmask"
OVERFLOW_POLICIES = ("error", "truncate", "drop")


def mask_prefix(prefix: str | Path) -> str:
    return f"{prefix}{MASK_SUFFIX}"


def description_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.chat.json")


def tokenizer_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.tokenizer")


def read_description(prefix: str | Path) -> Optional[dict]:
    """The ``.chat.json`` of a chat dataset, or None for plain token data."""
    return read_json_description(description_path(prefix), FORMAT, "chat")


def read_json_description(path: Path, fmt: str, kind: str) -> Optional[dict]:
    """A dataset description written beside its prefix (None when absent); one error naming the
    file when it is unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable {kind} dataset description ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ConfigError(f"{path}: not a {fmt} description")
    return data


@dataclass
class ChatSummary:
    """What ``prepare-chat`` wrote, and what it left out and why."""

    output_prefix: str
    template: str
    loss_on: str
    tokenizer: str
    eos_id: int
    conversations: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    longest: int = 0
    truncated: int = 0
    seconds: float = 0.0
    rejected: dict = field(default_factory=dict)
    rejected_examples: dict = field(default_factory=dict)
    format: str = FORMAT

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def lines(self) -> list[str]:
        out = [f"wrote {self.output_prefix}.bin/.idx, {mask_prefix(self.output_prefix)}.bin/.idx, "
               f"{tokenizer_path(self.output_prefix)}/",
               f"  template       {self.template} (loss on {self.loss_on})",
               f"  conversations  {self.conversations:,} (longest {self.longest:,} tokens)",
               f"  tokens         {self.tokens:,} (EOS included)",
               f"  supervised     {self.supervised_tokens:,} ({100 * self.supervised_share:.1f}% of tokens)",
               f"  time           {self.seconds:.1f} s"]
        if self.truncated:
            out.append(f"  truncated      {self.truncated:,} (to --max-length)")
        for reason, count in sorted(self.rejected.items()):
            out.append(f"  left out: {reason}: {count:,} (first at {self.rejected_examples[reason]})")
        return out


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


def open_chat_tokenizer(source, dest: Path, template: str, now, *, need_marks: bool, why: str,
                        otherwise: str):
    """Write the chat tokenizer to ``dest`` (a ``.partial`` name) with ``template`` as its
    ``chat_template``; returns (tokenizer, template, EOS id). ``dest`` is removed on failure."""
    from megasmol.data.chat.special_tokens import set_chat_template, write_chat_tokenizer

    chat_tokenizer = write_chat_tokenizer(source, dest)
    try:
        chosen = load_template(template, chat_tokenizer, now=now)
        if need_marks and not chosen.marks_generation:
            raise ConfigError(f"chat template {chosen.name} marks no assistant text ({{% generation %}} "
                              f"... {{% endgeneration %}}), so {why} cannot come from it; {otherwise}")
        eos_id = chat_tokenizer.eos_token_id
        if eos_id is None:
            raise ConfigError(f"tokenizer {source}: has no EOS token to end documents with")
        set_chat_template(dest, chosen.source)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return chat_tokenizer, chosen, int(eos_id)


def commit_outputs(partial: dict[Path, Path], idx: Path) -> None:
    """Rename every ``.partial`` output into place, the token ``idx`` last: a prefix with an
    ``.idx`` is whole, and an old ``.idx`` never pairs with new files."""
    idx.unlink(missing_ok=True)
    for final, tmp in partial.items():
        if final == idx:
            continue
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    os.replace(partial[idx], idx)


class MaskedDocuments:
    """The token and loss-mask indexed datasets of a prefix, written side by side under their
    ``.partial`` names."""

    def __init__(self, prefix: Path, partial: dict[Path, Path], token_dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.partial = prefix, partial
        self.tokens = IndexedDatasetBuilder(str(partial[Path(f"{prefix}.bin")]), dtype=token_dtype.type)
        self.masks = IndexedDatasetBuilder(str(partial[Path(f"{mask_prefix(prefix)}.bin")]), dtype=np.uint8)
        self.token_dtype = token_dtype

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: list[int]) -> None:
        """One document (of one or more sequences of ``lengths``)."""
        self.tokens.add_document(ids.astype(self.token_dtype), lengths)
        self.masks.add_document(mask.astype(np.uint8), lengths)

    def __enter__(self) -> "MaskedDocuments":
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is not None:  # nothing half-written stays behind
            self.tokens.data_file.close()
            self.masks.data_file.close()
            remove_partial(self.partial)
        return False

    def publish(self, summary, issues, count: int, what: str, description: Path, started: float) -> None:
        """Finish the files and rename them into place; one error, and nothing written, when no
        record became a document (``what``: e.g. "prepare-chat: no usable conversation")."""
        summary.rejected, summary.rejected_examples = dict(issues.counts), dict(issues.examples)
        if count == 0:
            reasons = ", ".join(f"{k}={v}" for k, v in issues.counts.items()) or "no records"
            raise ConfigError(f"{what} in the inputs ({reasons}); nothing was written"
                              + reason_hint(issues.counts))
        self.masks.finalize(str(self.partial[Path(f"{mask_prefix(self.prefix)}.idx")]))
        self.tokens.finalize(str(self.partial[Path(f"{self.prefix}.idx")]))
        summary.seconds = round(time.perf_counter() - started, 3)
        publish(summary, self.prefix, self.partial, description)


def open_masked_documents(prefix: str, kind: str, command: str):
    """(tokens, mask): a prefix's token and aligned loss-mask ``IndexedDataset``s, or one error
    naming the file that is missing or does not match (``kind`` and ``command`` say what to
    prepare again)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = IndexedDataset(str(prefix))
    mask = mask_prefix(prefix)
    if not (Path(mask + ".bin").is_file() and Path(mask + ".idx").is_file()):
        raise ConfigError(f"{kind} dataset {prefix}: its loss mask {mask}.bin/.idx is missing; "
                          f"prepare it again with {command}")
    masks = IndexedDataset(mask)
    if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
        raise ConfigError(f"{kind} dataset {prefix}: {mask}.idx does not match {prefix}.idx "
                          f"(lengths differ); prepare it again with {command}")
    return tokens, masks


def check_out_folder(out_prefix: str) -> None:
    """One line naming ``--out`` when its folder cannot be made (a part of it is a file) or lies
    in a checkpoint's iteration directory (refused as ``init``, ``import-hf`` and ``average``
    refuse it: the data would become part of that checkpoint)."""
    from megasmol.ckpt.checkpoint import enclosing_iteration

    from megasmol.utils.fs import existing_ancestor

    existing = existing_ancestor(Path(out_prefix).absolute().parent)
    if not existing.is_dir():
        raise ConfigError(f"--out {out_prefix}: {existing} is a file, not a folder; choose a prefix "
                          "in a folder")
    inside = enclosing_iteration(existing)
    if inside is not None:
        raise ConfigError(f"--out {out_prefix}: inside checkpoint {inside}, where the data would "
                          "become part of that checkpoint; choose a folder outside it")


def output_files(out_prefix: str, description: Path, template: str, overwrite: bool,
                 ) -> tuple[Path, dict[Path, Path]]:
    """(prefix, {final: partial name}) of a prefix about to be written: the folder is created, an
    existing prefix is refused without ``overwrite``, a bad template name fails before any work,
    and leftovers of an interrupted run are removed."""
    prefix = Path(out_prefix)
    check_out_folder(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    finals = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), Path(f"{mask_prefix(prefix)}.bin"),
              Path(f"{mask_prefix(prefix)}.idx"), description, tokenizer_path(prefix)]
    if any(p.exists() for p in finals) and not overwrite:
        raise FileExistsError(f"{prefix}.* already exists (use --overwrite to replace it)")
    if template != "tokenizer":
        load_template(template)  # a bad name or file fails here, before any tokenizer work
    partial = {p: p.with_name(p.name + ".partial") for p in finals}
    remove_partial(partial)
    return prefix, partial


def publish(summary, prefix: Path, partial: dict[Path, Path], description: Path) -> None:
    """Write the description (and ``PREFIX.stats.json``) of a finished prefix, then rename every
    output into place, the token ``.idx`` last."""
    data = {**asdict(summary), "tokenizer_dir": tokenizer_path(prefix).name,
            "mask_prefix": Path(mask_prefix(prefix)).name}
    text = json.dumps(data, indent=2) + "\n"
    partial[description].write_text(text)
    stats = Path(f"{prefix}.stats.json.partial")
    stats.write_text(text)
    os.replace(stats, f"{prefix}.stats.json")
    commit_outputs(partial, Path(f"{prefix}.idx"))


def remove_partial(partial: dict[Path, Path]) -> None:
    for path in partial.values():
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def prepare_chat(inputs: list[str], out_prefix: str, *, template: str = "smollm3",
                 tokenizer: Optional[str] = None, max_length: Optional[int] = None,
                 on_overflow: Literal["error", "truncate", "drop"] = "error",
                 loss_on: Literal["assistant", "all"] = "assistant", messages_key: str = "messages",
                 split: str = "train", overwrite: bool = False, show_progress: bool = True,
                 now=None) -> ChatSummary:
    from megasmol.data.tokenize import choose_dtype
    from megasmol.tokenizer import default_tokenizer_dir

    if loss_on not in ("assistant", "all"):
        raise ConfigError(f"--loss-on must be assistant or all, got {loss_on!r}")
    if on_overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"--on-overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {on_overflow!r}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"--max-length must be >= 2, got {max_length}")
    source = tokenizer or default_tokenizer_dir()
    prefix, partial = output_files(out_prefix, description_path(out_prefix), template, overwrite)
    chat_tokenizer, chosen, eos_id = open_chat_tokenizer(
        source, partial[tokenizer_path(prefix)], template, now,
        need_marks=loss_on == "assistant", why="an assistant-only loss mask",
        otherwise="mark the replies in the template or use --loss-on all")
    summary = ChatSummary(str(prefix), chosen.name, loss_on, str(source), int(eos_id))
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
                        issues.add("too_long" if on_overflow == "error" else "dropped_too_long",
                                   conversation.where)
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
                    description_path(prefix), start)
    return summary
