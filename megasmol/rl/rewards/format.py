"""``format``: a ``<think>...</think>`` block required or forbidden (per reasoning mode with
``per_mode``: SmolLM3's /think prompts reason in a think block, /no_think prompts carry an empty
one in the prompt and must not open another)."""

from __future__ import annotations

import re

from megasmol.rl.rewards.base import Reward, RewardError

OPEN, CLOSE = "<think>", "</think>"
_THOUGHT_THEN_ANSWER = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*\S", re.S)


def has_think_block(completion: str) -> bool:
    """One closed think block at the start, and an answer after it."""
    return bool(_THOUGHT_THEN_ANSWER.match(completion)) and completion.count(OPEN) == 1 \
        and completion.count(CLOSE) == 1


def has_no_think_tags(completion: str) -> bool:
    return OPEN not in completion and CLOSE not in completion


RULES = {"required": has_think_block, "forbidden": has_no_think_tags}
MODE_RULES = {"think": "required", "no_think": "forbidden"}


class FormatReward(Reward):
    """1.0 when the completion's form is the one asked for, else 0.0."""

    def __init__(self, spec):
        super().__init__(spec)
        self.think = spec.options()["think"]

    def _rule(self, index: int, record):
        if self.think != "per_mode":
            return RULES[self.think]
        if record.mode not in MODE_RULES:
            raise RewardError(f"reward {self.name} (think: per_mode): sample {index}'s prompt has no "
                              f"reasoning mode (/think or /no_think; from {record.where or '?'})")
        return RULES[MODE_RULES[record.mode]]

    def score(self, completions, records):
        return [float(self._rule(i, r)(c)) for i, (c, r) in enumerate(zip(completions, records))]
