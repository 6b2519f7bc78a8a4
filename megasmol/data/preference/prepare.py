"""``prepare-preferences``: render preference pairs into tokens plus completion loss masks.

Output, beside each other (``PREFIX`` is ``--out``):

* ``PREFIX.bin/.idx`` -- a Megatron-Core indexed dataset with one document per pair holding two
  sequences, prompt+chosen then prompt+rejected, each ending in EOS (so document masking keeps
  the halves apart when they are packed together);
* ``PREFIX_lossmask.bin/.idx`` -- the aligned uint8 mask: 1 on each completion's tokens (for a
  chat template, the assistant text and the ``<|im_end|>`` closing it; for plain strings, the
  completion and its EOS, as TRL trains them), 0 on the prompt;
* ``PREFIX.tokenizer/`` and ``PREFIX.pref.json`` (what the files are, counts, what was left out).

The prompt tokens of the two halves are the same (checked). Files are written under
``.partial`` names and renamed when complete, the token ``.idx`` last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.masked.descriptions import PREFERENCE
from megasmol.data.masked.layout import tokenizer_path
from megasmol.data.masked.overflow import check_overflow, overflow_reason
from megasmol.data.masked.publish import MaskedDocuments, output_files
from megasmol.data.masked.summary import MaskedSummary
from megasmol.data.messages.template import ChatTemplate, TemplateRenderError, token_mask
from megasmol.data.preference.records import PreferencePair, read_pairs
from megasmol.data.readers import ReadIssues
from megasmol.utils.progress import progress_bar


def description_path(prefix: str | Path) -> Path:
    return PREFERENCE.path(prefix)


def read_pref_description(prefix: str | Path) -> Optional[dict]:
    """The ``.pref.json`` of a preference dataset, or None when ``prefix`` is not one."""
    return PREFERENCE.read(prefix)


@dataclass
class PreferenceSummary(MaskedSummary):
    """What ``prepare-preferences`` wrote, and what it left out and why."""

    pairs: int = 0
    plain_pairs: int = 0
    """Pairs from plain-string records (no chat template); the others are conversations."""
    longest_pair: int = 0
    """The longest pair's tokens, both halves."""
    format: str = PREFERENCE.format

    def outputs(self) -> list[str]:
        return super().outputs() + [str(PREFERENCE.path(self.output_prefix))]

    def rows(self) -> list[tuple[str, str]]:
        rows = [("template", self.template),
                ("pairs", f"{self.pairs:,} (longest pair {self.longest_pair:,} tokens, both halves)"),
                self.tokens_row(),
                ("completions", f"{self.supervised_tokens:,} tokens ({self.share_text()})"),
                self.time_row()]
        if self.truncated:
            rows.append(("truncated", f"{self.truncated:,} completion(s) (to --max-length)"))
        return rows

    def notes(self) -> list[str]:
        if not 0 < self.plain_pairs < self.pairs:
            return []
        return [f"  note: mixed formats: {self.plain_pairs:,} plain-string pair(s) (no chat "
                f"template) and {self.pairs - self.plain_pairs:,} conversation pair(s) "
                f"({self.template}): the model learns both prompt formats; prepare them "
                "apart if that is not meant"]


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PairRenderer:
    """Turns a pair into two (token ids, completion mask) halves, or a reason it cannot."""

    def __init__(self, tokenizer, template: ChatTemplate, eos_id: int):
        self.tokenizer, self.template, self.eos_id = tokenizer, template, eos_id
        self.eos_text = tokenizer.convert_ids_to_tokens(eos_id)

    def render(self, pair: PreferencePair):
        """((chosen ids, mask), (rejected ids, mask)) or a reason string."""
        return self._conversation(pair) if pair.conversational else self._standard(pair)

    def _standard(self, pair: PreferencePair):
        """TRL's standard format: prompt + completion + EOS tokenized as one string; the
        completion starts where the prompt's own tokens stop matching (TRL's rule)."""
        def encode(text):
            return list(self.tokenizer(text)["input_ids"])

        prompt = encode(pair.prompt)
        halves = []
        for completion in (pair.chosen, pair.rejected):
            text = completion if completion.endswith(self.eos_text) else completion + self.eos_text
            halves.append(encode(pair.prompt + text))
        start = min(_common_prefix(prompt, ids) for ids in halves)
        out = []
        for ids in halves:
            if ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            mask = np.zeros(len(ids), np.uint8)
            mask[start:] = 1
            out.append((np.asarray(ids, np.int64), mask))
        return tuple(out)

    def _conversation(self, pair: PreferencePair):
        try:
            prompt_text = self.template.render(pair.prompt, tools=pair.tools, add_generation_prompt=True,
                                               **pair.kwargs).text
            rendered = [self.template.render(pair.prompt + completion, tools=pair.tools, **pair.kwargs)
                        for completion in (pair.chosen, pair.rejected)]
        except TemplateRenderError:
            return "template_error"
        out, prompts = [], []
        for full in rendered:
            start = _common_prefix(prompt_text, full.text)
            spans = [(max(a, start), b) for a, b in full.spans if b > start]
            enc = self.tokenizer(full.text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
            mask = token_mask(offsets, spans)
            first = int(np.argmax(mask)) if mask.any() else len(ids)
            prompts.append(ids[:first])
            out.append((np.append(np.asarray(ids, np.int64), self.eos_id), np.append(mask, np.uint8(0))))
        if prompts[0] != prompts[1]:
            return "prompt_tokens_differ"
        return tuple(out)


def _fit(ids: np.ndarray, mask: np.ndarray, max_length: int, eos_id: int):
    """Cut the completion so the half fits ``max_length`` (EOS kept, not trained); None when the
    prompt alone leaves no completion token."""
    keep = max_length - 1
    if not mask[:keep].any():
        return None
    return np.append(ids[:keep], eos_id), np.append(mask[:keep], np.uint8(0))


def prepare_preferences(inputs: list[str], out_prefix: str, *, template: str = "smollm3",
                        tokenizer: Optional[str] = None, max_length: Optional[int] = None,
                        on_overflow: str = "error", split: str = "train", overwrite: bool = False,
                        show_progress: bool = True, now=None) -> PreferenceSummary:
    """Render every pair of ``inputs``; ``max_length`` limits each half (prompt + completion + EOS)."""
    from megasmol.data.messages.special_tokens import open_chat_tokenizer
    from megasmol.data.tokenize import choose_dtype
    from megasmol.tokenizer import default_tokenizer_dir

    check_overflow(on_overflow)
    if max_length is not None and max_length < 3:
        raise ConfigError(f"--max-length must be >= 3, got {max_length}")
    source = tokenizer or default_tokenizer_dir()
    prefix, partial = output_files(out_prefix, PREFERENCE.path(out_prefix), overwrite)
    chat_tokenizer, chosen_template, eos_id = open_chat_tokenizer(
        source, partial[tokenizer_path(prefix)], template, now, need_marks=True,
        why="the completion loss mask", otherwise="mark the replies in the template")
    renderer = PairRenderer(chat_tokenizer, chosen_template, eos_id)
    summary = PreferenceSummary(str(prefix), chosen_template.name, str(source), eos_id)
    issues = ReadIssues()
    start = time.perf_counter()
    with MaskedDocuments(prefix, partial, choose_dtype("auto", len(chat_tokenizer))) as out:
        with progress_bar(None, "prepare-preferences", enabled=show_progress, unit="pair") as bar:
            for pair in read_pairs(inputs, issues, split=split):
                bar.update(1)
                halves = renderer.render(pair)
                if isinstance(halves, str):
                    issues.add(halves, pair.where)
                    continue
                if max_length is not None and any(len(ids) > max_length for ids, _ in halves):
                    if on_overflow != "truncate":
                        issues.add(overflow_reason(on_overflow), pair.where)
                        continue
                    fitted = [h if len(h[0]) <= max_length else _fit(*h, max_length, eos_id) for h in halves]
                    if any(h is None for h in fitted):
                        issues.add("prompt_too_long", pair.where)
                        continue
                    summary.truncated += sum(len(a[0]) != len(b[0]) for a, b in zip(halves, fitted))
                    halves = fitted
                if not all(mask.any() for _, mask in halves):
                    issues.add("empty_completion", pair.where)
                    continue
                ids = np.concatenate([h[0] for h in halves])
                lengths = [len(h[0]) for h in halves]
                out.add(ids, np.concatenate([h[1] for h in halves]), lengths)
                summary.pairs += 1
                summary.plain_pairs += not pair.conversational
                summary.tokens += len(ids)
                summary.supervised_tokens += int(sum(h[1].sum() for h in halves))
                summary.longest_pair = max(summary.longest_pair, len(ids))
        out.publish(summary, issues, summary.pairs, "prepare-preferences: no usable pair",
                    PREFERENCE.path(prefix), start)
    return summary
