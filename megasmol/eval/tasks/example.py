"""One question of a task, as every layer above sees it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    context: str
    choices: list[str]
    gold: int
    record: dict = field(default_factory=dict)
    subset: str = ""
    description: str = ""
    """Text before everything else in the prompt, few-shot examples included (lm-eval's)."""
