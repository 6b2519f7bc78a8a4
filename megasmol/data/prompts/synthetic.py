"""Verifiable arithmetic prompts for the RL demo and the tests: the SFT demo's questions
(:mod:`megasmol.data.chat.synthetic`: its system turn, "What is A + B?") without the reply, with
the sum as the reference answer a math reward checks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megasmol.data.chat.synthetic import (
    arithmetic_pairs,
    arithmetic_record,
    grade,
    in_answer_form,
    write_jsonl,
)

_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def arithmetic_prompt(a: int, b: int) -> dict:
    """``{"prompt": [system, user], "answer": "A+B"}``: prepare-prompts' default fields."""
    return {"prompt": arithmetic_record(a, b, answered=False)["messages"], "answer": str(a + b)}


def write_arithmetic_prompts(path: str | Path, pairs: Iterable[tuple[int, int]] | None = None, *,
                             count: int = 64, seed: int = 0, high: int = 20) -> Path:
    """A JSONL of arithmetic prompts: ``pairs`` (e.g. one side of
    :func:`~megasmol.data.chat.synthetic.split_arithmetic`), or ``count`` seeded draws with
    operands in [0, ``high``]. Written under a temporary name and renamed."""
    chosen = list(pairs) if pairs is not None else arithmetic_pairs(count, seed, high)
    return write_jsonl([arithmetic_prompt(a, b) for a, b in chosen], Path(path))


def restates_question(completions: list[str], records: list[Any], **_: Any) -> list[float]:
    """A form reward for the RL demo's prompts (``module:function``; tried with the demo, not in its
    shipped config: README): 1 when the reply is in the SFT demo's answer
    form ``A + B = C.`` with the question's own A and B (C right or not: the ``math`` reward
    scores it), else 0. The question is read from the rendered prompt (its last "What is A + B?")."""
    scores = []
    for completion, record in zip(completions, records):
        asked = _QUESTION.findall(record.text)
        if not asked:
            raise ValueError(f"{record.where}: no 'What is A + B?' question in the prompt")
        a, b = map(int, asked[-1])
        scores.append(float(grade(completion, a, b)[1]))
    return scores


def answer_form(completions: list[str], records: list[Any], **_: Any) -> list[float]:
    """The RL demo's reward (``module:function``): 1 when the whole reply is in the answer form the
    system turn asks for, ``A + B = C.`` and nothing more (any numbers: the ``math`` reward scores
    the sum), else 0. A rule checked on the text, as IFEval's verifiable instructions are: it
    holds for every question, so what GRPO learns from it can be measured on held-out ones."""
    return [float(in_answer_form(completion)) for completion in completions]
