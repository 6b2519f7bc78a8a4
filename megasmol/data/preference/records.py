"""Preference records: read them in TRL's preference formats and check their shape.

Accepted layouts (TRL's ``DPOTrainer`` dataset formats):

* explicit prompt, conversational: ``{"prompt": [messages], "chosen": [messages], "rejected":
  [messages]}`` -- the completions are the assistant turn(s) that follow the prompt;
* explicit prompt, standard: ``prompt``, ``chosen`` and ``rejected`` are plain strings (no chat
  template: the completion is the text after the prompt, closed by EOS, as TRL trains it);
* implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, two whole conversations
  whose shared leading messages are the prompt.

Optional ``tools`` and ``chat_template_kwargs`` (SmolLM3's ``enable_thinking``, as in
``smoltalk2``'s Preference config) go to the template. Whatever cannot become a pair is counted
under a named reason with its first location, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

from megasmol.data.messages.records import Messages, check_messages, read_records, template_extras
from megasmol.data.readers import ReadIssues


@dataclass
class PreferencePair:
    """One prompt with a preferred and a dispreferred completion."""

    prompt: Union[Messages, str]
    chosen: Union[Messages, str]
    rejected: Union[Messages, str]
    where: str
    tools: Optional[list] = None
    kwargs: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def _completion_reason(messages: Messages) -> Optional[str]:
    """Why a list of completion messages cannot be trained on (None: it can)."""
    if not messages or messages[-1]["role"] != "assistant":
        return "completion_not_assistant"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "empty_completion"
    return None


def _shared_prefix(a: Messages, b: Messages) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_pair(record, where: str) -> tuple[Optional[PreferencePair], Optional[str]]:
    """(pair, None) for a usable record, else (None, reason)."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        return None, "missing_field"
    tools, kwargs, reason = template_extras(record)
    if reason:
        return None, reason
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            return None, "mixed_formats"
        if prompt is None:
            return None, "missing_field"  # implicit prompts are read from conversations only
        if not isinstance(prompt, str):
            return None, "mixed_formats"
        if not chosen.strip() or not rejected.strip():
            return None, "empty_completion"
        if chosen == rejected:
            return None, "chosen_equals_rejected"
        return PreferencePair(prompt, chosen, rejected, where, tools, kwargs), None
    chosen, reason = check_messages(chosen)
    if reason is None:
        rejected, reason = check_messages(rejected)
    if reason:
        return None, reason
    if prompt is None:  # implicit: the shared leading messages are the prompt
        if chosen == rejected:
            return None, "chosen_equals_rejected"
        shared = _shared_prefix(chosen, rejected)
        if shared == 0:
            return None, "prompt_not_a_prefix"
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        if isinstance(prompt, str):
            return None, "mixed_formats"
        prompt, reason = check_messages(prompt)
        if reason:
            return None, reason
    if not prompt:
        return None, "missing_field"
    for completion in (chosen, rejected):
        reason = _completion_reason(completion)
        if reason:
            return None, reason
    if chosen == rejected:
        return None, "chosen_equals_rejected"
    return PreferencePair(prompt, chosen, rejected, where, tools, kwargs), None


def read_pairs(inputs: list[str], issues: ReadIssues, *, split: str = "train") -> Iterator[PreferencePair]:
    """Every usable pair of ``inputs`` (files, ``datasets`` directories, ``hf:ID``: see
    :func:`~megasmol.data.messages.records.read_records`)."""
    for record, where in read_records(inputs, issues, split):
        pair, reason = check_pair(record, where)
        if reason:
            issues.add(reason, where)
        else:
            yield pair
