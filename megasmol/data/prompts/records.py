"""Prompt records for RL: a prompt and what its reward needs, read from JSONL, Parquet, a
``datasets`` directory or ``hf:ID`` (:func:`~megasmol.data.messages.records.read_records`).

A record holds a prompt under ``prompt_key`` (a plain string, or a list of messages that the chat
template renders up to and including the assistant's generation prompt) and, for the reward, a
reference answer under ``answer_key`` (math) or tests under ``tests_key`` with the function they
call under ``entry_point_key`` (code, HumanEval's layout). A GSM8K answer (the worked solution
ending in ``#### N``) is reduced to its final answer ``N``; a HumanEval ``test`` that defines
``check`` but does not call it gets ``check(ENTRY_POINT)`` appended, so the stored tests run as
they are. Whatever cannot be used is counted under a named reason with its first location.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

from megasmol.data.messages.records import Messages, check_messages, read_records, template_extras
from megasmol.data.readers import ReadIssues


@dataclass(frozen=True)
class Fields:
    """Which record fields hold what (the ``--*-key`` flags)."""

    prompt: str = "prompt"
    answer: str = "answer"
    tests: str = "test"
    entry_point: str = "entry_point"


@dataclass
class PromptSource:
    """One usable record, before rendering."""

    prompt: Union[Messages, str]
    where: str
    answer: Optional[str] = None
    tests: Optional[str] = None
    entry_point: Optional[str] = None
    tools: Optional[list] = None
    kwargs: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


_DEFINES_CHECK = re.compile(r"^def check\(", re.M)
_CALLS_CHECK = re.compile(r"^check\(", re.M)


def final_answer(answer: str) -> str:
    """The reference a math reward compares with: a GSM8K worked answer (``... #### 72``) reduced
    to what follows its last ``####``; any other answer stripped."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    return answer.strip()


def runnable_tests(tests: str, entry_point: str) -> str:
    """HumanEval's ``test`` defines ``check(candidate)``; the harness then calls it on the entry
    point. Tests that define ``check`` without calling it get that call appended."""
    if _DEFINES_CHECK.search(tests) and not _CALLS_CHECK.search(tests):
        return tests.rstrip("\n") + f"\n\ncheck({entry_point})\n"
    return tests


def _text(value) -> tuple[Optional[str], Optional[str]]:
    """A reference field as text (numbers become their decimal text), or the reason it is not."""
    if isinstance(value, bool):
        return None, "malformed_answer"
    if isinstance(value, (int, float)):
        return str(value), None
    if not isinstance(value, str):
        return None, "malformed_answer"
    if not value.strip():
        return None, "empty_answer"
    return value, None


def check_record(record, where: str, fields: Fields) -> tuple[Optional[PromptSource], Optional[str]]:
    """(prompt, None) for a usable record, else (None, reason)."""
    if not isinstance(record, dict) or record.get(fields.prompt) is None:
        return None, "missing_prompt"
    prompt = record[fields.prompt]
    if isinstance(prompt, str):
        if not prompt.strip():
            return None, "empty_prompt"
    else:
        prompt, reason = check_messages(prompt)
        if reason:
            return None, reason
        if not prompt or all(not m["content"].strip() for m in prompt):
            return None, "empty_prompt"
        if prompt[-1]["role"] == "assistant":
            return None, "prompt_ends_with_assistant"
    tools, kwargs, reason = template_extras(record)
    if reason:
        return None, reason
    source = PromptSource(prompt, where, tools=tools, kwargs=kwargs)
    if record.get(fields.answer) is not None:
        answer, reason = _text(record[fields.answer])
        if answer is None:
            return None, reason
        source.answer = final_answer(answer)
    if record.get(fields.tests) is not None:
        tests, entry = record[fields.tests], record.get(fields.entry_point)
        if not isinstance(tests, str) or not tests.strip():
            return None, "malformed_tests"
        if not isinstance(entry, str) or not entry.isidentifier():
            return None, "missing_entry_point"
        source.tests, source.entry_point = runnable_tests(tests, entry), entry
    if source.answer is None and source.tests is None:
        return None, "missing_answer"
    return source, None


def read_prompt_records(inputs: list[str], issues: ReadIssues, fields: Optional[Fields] = None, *,
                        split: str = "train") -> Iterator[PromptSource]:
    """Every usable prompt of ``inputs``."""
    fields = fields or Fields()
    for record, where in read_records(inputs, issues, split):
        source, reason = check_record(record, where, fields)
        if source is None:
            issues.add(reason or "unusable", where)
        else:
            yield source
