"""Conversation records: ``{"messages": [...]}`` with at least one assistant turn.

The reading and the message-list shape are :mod:`megasmol.data.messages.records`'; this module
says what makes a record a conversation ``prepare-chat`` can train on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

from megasmol.data.messages.records import check_messages, read_records, template_extras
from megasmol.data.readers import ReadIssues


@dataclass
class Conversation:
    messages: list[dict]
    where: str
    tools: Optional[list] = None
    kwargs: dict = field(default_factory=dict)


PREFERENCE_PAIR = "preference_pair"
"""The reason a record without messages but with ``chosen`` and ``rejected`` (TRL's preference
layouts) is left out: it is a pair, for ``prepare-preferences``."""


def reason_hint(counts) -> str:
    """What to do about the reasons in ``counts`` (``ReadIssues.counts``), where one is known."""
    if counts.get(PREFERENCE_PAIR):
        return ("; the records with chosen/rejected fields are preference pairs: prepare them with "
                "`megasmol prepare-preferences` (docs/preference.md)")
    return ""


def check_record(record, where: str, messages_key: str) -> tuple[Optional[Conversation], Optional[str]]:
    """(conversation, None) for a usable record, else (None, reason)."""
    if not isinstance(record, dict) or messages_key not in record:
        if isinstance(record, dict) and {"chosen", "rejected"} <= record.keys():
            return None, PREFERENCE_PAIR
        return None, "missing_messages"
    clean, reason = check_messages(record[messages_key])
    if reason:
        return None, reason
    if not clean:
        return None, "empty_conversation"
    if not any(m["role"] == "assistant" for m in clean):
        return None, "no_assistant_turn"
    if all(not m["content"].strip() for m in clean):
        return None, "empty_conversation"
    tools, kwargs, reason = template_extras(record)
    if reason:
        return None, reason
    return Conversation(clean, where, tools, kwargs), None


def read_conversations(inputs: list[str], issues: ReadIssues, *, messages_key: str = "messages",
                       split: str = "train") -> Iterator[Conversation]:
    """Every usable conversation of ``inputs`` (see
    :func:`~megasmol.data.messages.records.read_records`)."""
    for record, where in read_records(inputs, issues, split):
        conversation, reason = check_record(record, where, messages_key)
        if reason:
            issues.add(reason, where)
        else:
            yield conversation
