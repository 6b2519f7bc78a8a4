"""``fg`` (free generation): greedy decoding with the KV cache until a stop string, the answer
extracted with the task's regular expression (the last match, as lm-eval's GSM8K
"flexible-extract") and compared with the reference after removing the task's ``answer_ignore``
expressions (by default ``$``, thousands commas and a final period); ``exact_match``."""

from __future__ import annotations

import re
from collections.abc import Sequence

from megasmol.eval.formulations.base import Answer, Formulation, Scored
from megasmol.eval.tasks.example import Example


def extract_answer(generation: str, pattern: str, select: int = -1) -> str:
    """Match ``select`` of ``pattern`` in ``generation`` (its first non-empty group), or "":
    the last by default (lm-eval's ``group_select: -1``, GSM8K "flexible-extract"), the first
    with 0 (its default, "strict-match")."""
    matches = list(re.finditer(pattern, generation))
    if not matches:
        return ""
    match = matches[select]
    groups = [g for g in match.groups() if g] if match.groups() else [match.group(0)]
    return groups[0] if groups else match.group(0)


DEFAULT_IGNORE = (",", r"\$", r"\.$")
"""What exact match drops unless a task says otherwise: thousands commas, ``$``, a final period."""


def normalize_answer(text: str, ignore: Sequence[str] = DEFAULT_IGNORE, ignore_case: bool = False) -> str:
    """The text exact match compares: stripped, each of ``ignore``'s regular expressions removed
    in order, then lower-cased with ``ignore_case`` (lm-eval's ``exact_match`` options)."""
    text = text.strip()
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text


def cut_at_stop(generation: str, until: list[str]) -> str:
    cut = min((generation.find(stop) for stop in until if stop in generation), default=-1)
    return generation if cut < 0 else generation[:cut]


def judge_generation(index: int, example: Example, prompt: str, generation: str, pattern: str,
                     ignore: Sequence[str] = DEFAULT_IGNORE, ignore_case: bool = False) -> Scored:
    extracted = extract_answer(generation, pattern)
    hit = (normalize_answer(extracted, ignore, ignore_case)
           == normalize_answer(example.choices[0], ignore, ignore_case))
    return Scored(index, prompt, [generation], [], 0, 0 if hit else -1, 0 if hit else -1,
                  {"exact_match": float(hit)}, extracted)


class Generative(Formulation):
    """A greedy generation after the prompt, cut at the task's first stop string."""

    generative = True
    has_chance = False

    def prompt(self, example: Example, delimiter: str, shots: list[Example]) -> str:
        raise NotImplementedError

    def prompt_and_continuations(self, example, delimiter, shots):
        return self.prompt(example, delimiter, shots), []

    def build(self, example, spec, shots):
        return self.prompt(example, spec.target_delimiter, shots), [], []

    def completion(self, text: str, spec) -> str:
        """The generation as judged: cut at the first of the task's stop strings."""
        return cut_at_stop(text, spec.until)


class FreeGeneration(Generative):
    name = "fg"

    def primary(self, spec) -> str:
        return "exact_match"

    def prompt(self, example, delimiter, shots):
        prefix = "".join(f"{s.context}{delimiter}{s.choices[0]}\n\n" for s in shots)
        return prefix + example.context

    def judge(self, index: int, example: Example, prompt: str, shown: list[str], answer: Answer,
              spec) -> Scored:
        if answer.completion is None or answer.generation is None:
            raise TypeError(f"formulation {self.name}: example {index} has no generation")
        scored = judge_generation(index, example, prompt, answer.completion, spec.answer_pattern,
                                  spec.answer_ignore, spec.ignore_case)
        scored.truncated = answer.generation.truncated
        return scored
