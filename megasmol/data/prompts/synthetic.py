"""Verifiable arithmetic prompts for the RL demo and the tests: the SFT demo's questions
(:mod:`megasmol.data.chat.synthetic`: its system turn, "What is A + B?") without the reply, with
the sum as the reference answer a math reward checks."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from megasmol.data.chat.synthetic import arithmetic_pairs, arithmetic_record, write_jsonl


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
