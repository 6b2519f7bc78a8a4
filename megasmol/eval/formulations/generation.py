"""``fg`` (free generation): greedy decoding with the KV cache until a stop string, the answer
extracted with the task's regular expression (the last match, as lm-eval's GSM8K
"flexible-extract") and compared after dropping ``$``, thousands commas and a final period;
``exact_match``."""

from __future__ import annotations

import re

from megasmol.eval.formulations.base import Answer, Formulation, Scored
from megasmol.eval.tasks.example import Example


def extract_answer(generation: str, pattern: str) -> str:
    """The last match of ``pattern`` in ``generation`` (its first non-empty group), or ""."""
    found = ""
    for match in re.finditer(pattern, generation):
        groups = [g for g in match.groups() if g] if match.groups() else [match.group(0)]
        found = groups[0] if groups else match.group(0)
    return found


def normalize_answer(text: str) -> str:
    """Exact match compares numbers as written, without $, thousands commas or a final period."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def cut_at_stop(generation: str, until: list[str]) -> str:
    cut = min((generation.find(stop) for stop in until if stop in generation), default=-1)
    return generation if cut < 0 else generation[:cut]


def judge_generation(index: int, example: Example, prompt: str, generation: str,
                     pattern: str) -> Scored:
    extracted = extract_answer(generation, pattern)
    hit = normalize_answer(extracted) == normalize_answer(example.choices[0])
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
        scored = judge_generation(index, example, prompt, answer.completion, spec.answer_pattern)
        scored.truncated = answer.generation.truncated
        return scored
