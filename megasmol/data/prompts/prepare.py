"""``prepare-prompts``: render RL prompts (with their reference answers or tests) into token ids.

Output: :mod:`megasmol.data.prompts.store` (``PREFIX.prompts.jsonl``, ``PREFIX.tokenizer/``,
``PREFIX.prompts.json``), written under ``.partial`` names and renamed when complete, the
description last. A conversational prompt is rendered with the chat template and its kwargs (the
record's ``chat_template_kwargs`` over ``--template-kwarg``) up to and including the assistant's
generation prompt; a plain string is kept as it is (the completion continues it), or, with
``--plain-prompts user``, becomes one user message (after ``--system``, if given).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megasmol.config.typed import ConfigError
from megasmol.data.masked.layout import tokenizer_path
from megasmol.data.masked.publish import check_out_folder, remove_partial
from megasmol.data.messages.template import ChatTemplate, TemplateRenderError
from megasmol.data.prompts.records import Fields, PromptSource, read_prompt_records
from megasmol.data.prompts.store import PROMPTS, PromptRecord, prompt_files, publish
from megasmol.data.readers import ReadIssues
from megasmol.errors import OutputExists
from megasmol.utils.progress import progress_bar

PLAIN_PROMPTS = ("text", "user")
DEFAULT_FIELDS = Fields()


@dataclass
class PromptsSummary:
    """What ``prepare-prompts`` wrote, and what it left out and why (also the description)."""

    output_prefix: str
    template: str
    tokenizer: str
    eos_id: int
    stop_ids: list = field(default_factory=list)
    """Token ids that end a completion: EOS and, for a chat tokenizer, the end-of-turn
    ``<|im_end|>``."""
    prompts: int = 0
    math: int = 0
    """Prompts with a reference answer."""
    code: int = 0
    """Prompts with tests."""
    chat: int = 0
    """Prompts rendered with the chat template (the others are plain strings)."""
    modes: dict = field(default_factory=dict)
    """{think | no_think | none: prompts}."""
    length_min: int = 0
    length_mean: float = 0.0
    length_p95: int = 0
    length_max: int = 0
    """Prompt token lengths."""
    seconds: float = 0.0
    rejected: dict = field(default_factory=dict)
    """{reason: records left out for it}."""
    rejected_examples: dict = field(default_factory=dict)
    """{reason: where the first such record is}."""
    format: str = PROMPTS.format

    def count(self, record: PromptRecord) -> None:
        self.prompts += 1
        self.math += record.answer is not None
        self.code += record.tests is not None
        self.chat += record.chat
        key = record.mode or "none"
        self.modes[key] = self.modes.get(key, 0) + 1

    def set_lengths(self, lengths: list[int]) -> None:
        ordered = sorted(lengths)
        self.length_min, self.length_max = ordered[0], ordered[-1]
        self.length_mean = round(statistics.fmean(ordered), 1)
        self.length_p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    def outputs(self) -> list[str]:
        return [str(p) + ("/" if p.suffix == ".tokenizer" else "") for p in prompt_files(self.output_prefix)]

    def lines(self) -> list[str]:
        rows = [("template", self.template),
                ("prompts", f"{self.prompts:,} (answers {self.math:,}, tests {self.code:,}; chat "
                            f"{self.chat:,}, plain {self.prompts - self.chat:,})"),
                ("modes", ", ".join(f"{k} {v:,}" for k, v in sorted(self.modes.items()))),
                ("prompt tokens", f"min {self.length_min:,}, mean {self.length_mean:,}, p95 "
                                  f"{self.length_p95:,}, max {self.length_max:,}"),
                ("time", f"{self.seconds:.1f} s")]
        out = ["wrote " + ", ".join(self.outputs())]
        out += [f"  {label:<14} {value}" for label, value in rows]
        for reason, count in sorted(self.rejected.items()):
            out.append(f"  left out: {reason}: {count:,} (first at {self.rejected_examples[reason]})")
        return out


def reasoning_mode(text: str, kwargs: dict) -> Optional[str]:
    """What the prompt asks for: ``/no_think`` or ``/think`` in its rendered text (SmolLM3's
    template writes the mode into the system turn), else the ``enable_thinking`` kwarg, else None."""
    if "/no_think" in text:
        return "no_think"
    if "/think" in text:
        return "think"
    thinking = kwargs.get("enable_thinking")
    return None if thinking is None else ("think" if thinking else "no_think")


class PromptRenderer:
    """A prompt source to a :class:`PromptRecord`, or the reason it cannot be one."""

    def __init__(self, tokenizer, template: ChatTemplate, template_kwargs: dict,
                 plain_prompts: str, system: Optional[str]):
        self.tokenizer, self.template = tokenizer, template
        self.template_kwargs, self.plain_prompts, self.system = template_kwargs, plain_prompts, system

    def render(self, source: PromptSource):
        prompt = source.prompt
        if isinstance(prompt, str) and self.plain_prompts == "user":
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
            return self._record(source, ids, prompt, False, reasoning_mode(prompt, {}))
        if self.system is not None and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": self.system}, *prompt]
        kwargs = {**self.template_kwargs, **source.kwargs}
        try:
            text = self.template.render(prompt, tools=source.tools, add_generation_prompt=True,
                                        **kwargs).text
        except TemplateRenderError:
            return "template_error"
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._record(source, ids, text, True, reasoning_mode(text, kwargs))

    @staticmethod
    def _record(source: PromptSource, ids: list[int], text: str, chat: bool, mode: Optional[str]):
        return PromptRecord([int(i) for i in ids], text, source.answer, source.tests, source.entry_point,
                            mode, chat, source.where)


def _output_files(out_prefix: str, overwrite: bool) -> tuple[Path, dict[Path, Path]]:
    prefix = Path(out_prefix)
    check_out_folder(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    finals = prompt_files(prefix)
    if any(p.exists() for p in finals) and not overwrite:
        raise OutputExists(f"{prefix}.prompts.* already exists (use --overwrite to replace it)")
    partial = {p: p.with_name(p.name + ".partial") for p in finals}
    remove_partial(partial)
    return prefix, partial


def prepare_prompts(inputs: list[str], out_prefix: str, *, template: str = "smollm3",
                    tokenizer: Optional[str] = None, template_kwargs: Optional[dict] = None,
                    plain_prompts: Literal["text", "user"] = "text", system: Optional[str] = None,
                    fields: Fields = DEFAULT_FIELDS, max_length: Optional[int] = None,
                    on_overflow: Literal["error", "drop"] = "error", split: str = "train",
                    overwrite: bool = False, show_progress: bool = True, now=None) -> PromptsSummary:
    """Render every usable prompt of ``inputs``; ``max_length`` limits the prompt's tokens
    (longer ones are left out: counted as ``too_long`` with ``error``, ``dropped_too_long`` with
    ``drop``)."""
    from megasmol.data.messages.special_tokens import open_chat_tokenizer, single_token_id
    from megasmol.tokenizer import default_tokenizer_dir

    if plain_prompts not in PLAIN_PROMPTS:
        raise ConfigError(f"--plain-prompts must be one of {', '.join(PLAIN_PROMPTS)}, got {plain_prompts!r}")
    if on_overflow not in ("error", "drop"):
        raise ConfigError(f"--on-overflow must be error or drop (a prompt is never cut), got {on_overflow!r}")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"--max-length must be >= 1, got {max_length}")
    source = tokenizer or default_tokenizer_dir()
    prefix, partial = _output_files(out_prefix, overwrite)
    chat_tokenizer, chosen, eos_id = open_chat_tokenizer(
        source, partial[tokenizer_path(prefix)], template, now, need_marks=False, why="", otherwise="")
    renderer = PromptRenderer(chat_tokenizer, chosen, dict(template_kwargs or {}), plain_prompts, system)
    end_of_turn = single_token_id(chat_tokenizer, "<|im_end|>")
    stop_ids = [eos_id] + ([int(end_of_turn)] if end_of_turn not in (None, eos_id) else [])
    summary = PromptsSummary(str(prefix), chosen.name, str(source), eos_id, stop_ids)
    issues = ReadIssues()
    lengths: list[int] = []
    start = time.perf_counter()
    try:
        with open(partial[Path(f"{prefix}.prompts.jsonl")], "w", encoding="utf-8") as out, \
                progress_bar(None, "prepare-prompts", enabled=show_progress, unit="prompt") as bar:
            for item in read_prompt_records(inputs, issues, fields, split=split):
                bar.update(1)
                record = renderer.render(item)
                if isinstance(record, str):
                    issues.add(record, item.where)
                    continue
                if max_length is not None and len(record.prompt_ids) > max_length:
                    issues.add("too_long" if on_overflow == "error" else "dropped_too_long", item.where)
                    continue
                out.write(record.to_json() + "\n")
                summary.count(record)
                lengths.append(len(record.prompt_ids))
        summary.rejected, summary.rejected_examples = dict(issues.counts), dict(issues.examples)
        if not summary.prompts:
            reasons = ", ".join(f"{k}={v}" for k, v in issues.counts.items()) or "no records"
            raise ConfigError(f"prepare-prompts: no usable prompt in the inputs ({reasons}); nothing "
                              f"was written (field names: --prompt-key {fields.prompt}, --answer-key "
                              f"{fields.answer}, --tests-key {fields.tests})")
        summary.set_lengths(lengths)
        summary.seconds = round(time.perf_counter() - start, 3)
        description = {**asdict(summary), "tokenizer_dir": tokenizer_path(prefix).name,
                       "records": f"{prefix.name}.prompts.jsonl"}
        publish(description, partial, prefix)
    except BaseException:
        remove_partial(partial)
        raise
    return summary
