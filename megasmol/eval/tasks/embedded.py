"""Offline tasks generated from what Python ships, for the demo and the tests (no download).

* ``demo_arithmetic``: held-out word problems from the demo corpus's generator (problems that
  also occur in the demo's training set are left out); the context is the problem and its worked
  solution up to "The answer is", the choices are the right number and three near misses
  (chance 0.25).
* ``demo_code``: next-line cloze over standard-library files the demo corpus did not sample: eight
  lines of code, then the real next line or one of three lines from other files (chance 0.25).

* ``demo_arithmetic_gen``: the same problems as free generation: the model writes the solution
  and the number after "The answer is" must equal the answer (exact match).
* ``demo_word_order``: held-out English prose, the standard library's docstrings shorter than the
  demo corpus's minimum (so never trained on): the context is all but the last sentence, the
  choices are the last sentence as written and three orders of its words (chance 0.25). The
  choices hold the same words, so only knowing how English is ordered tells them apart: an early
  signal, which a 300-step demo model already shows while the other tasks are at chance.

All are deterministic for a Python version: the same examples everywhere.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from megasmol.eval.tasks.example import Example
from megasmol.eval.tasks.spec import TaskSpec
from megasmol.eval.tasks.task import Task

SEED = 20251129
COUNT = 500
DEMO_SEED, DEMO_PROBLEMS, DEMO_CODE_BYTES = 1234, 20000, int(3.0 * 1e6)  # the demo corpus's


def arithmetic_examples(count: int, seed: int) -> list[Example]:
    from megasmol.data.demo_corpus import math_documents, math_problem

    seen = set(math_documents(DEMO_PROBLEMS, DEMO_SEED))
    rng, pick = random.Random(seed), random.Random(seed + 1)
    examples: list[Example] = []
    while len(examples) < count:
        text = math_problem(rng)
        if text in seen or "The answer is " not in text:
            continue
        head, _, tail = text.rpartition("The answer is ")
        answer = int(tail.rstrip("."))
        wrong = sorted({answer + d for d in (-10, -2, -1, 1, 2, 10) if answer + d >= 0} - {answer})
        choices = [answer] + pick.sample(wrong, 3)
        pick.shuffle(choices)
        examples.append(Example(head + "The answer is", [f"{c}." for c in choices],
                                choices.index(answer), {"problem": text}))
    return examples


def code_examples(count: int, seed: int) -> list[Example]:
    from megasmol.data.demo_corpus import code_documents, stdlib_sources

    used = set(code_documents(DEMO_CODE_BYTES, DEMO_SEED))
    files = []
    for path in stdlib_sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = [line.rstrip() for line in text.splitlines()]
        if text not in used and sum(bool(x.strip()) for x in lines) > 40:
            files.append((path, lines))
    rng = random.Random(seed)
    rng.shuffle(files)
    examples: list[Example] = []
    for path, lines in files:
        if len(examples) == count:
            break
        candidates = [i for i in range(8, len(lines)) if len(lines[i].strip()) > 12]
        if not candidates:
            continue
        at = rng.choice(candidates)
        others: list[str] = []
        while len(others) < 3:
            _, other_lines = rng.choice(files)
            line = rng.choice(other_lines)
            if len(line.strip()) > 12 and line != lines[at] and line not in others:
                others.append(line)
        choices = [lines[at]] + others
        rng.shuffle(choices)
        examples.append(Example("\n".join(lines[at - 8:at]) + "\n", choices,
                                choices.index(lines[at]), {"file": path.name, "line": at + 1}))
    return examples


def arithmetic_generation_examples(count: int, seed: int) -> list[Example]:
    """The same held-out problems, for free generation: the question alone, and the number."""
    out = []
    for example in arithmetic_examples(count, seed):
        problem = example.record["problem"]
        question, _, _ = problem.partition("\nAnswer:")
        answer = problem.rpartition("The answer is ")[2].rstrip(".")
        out.append(Example(question + "\nAnswer:", [answer], 0, example.record))
    return out


def _short_docstrings() -> list[str]:
    """Docstrings of 80 characters up to the demo corpus's minimum, whitespace collapsed."""
    from megasmol.data.demo_corpus import MIN_DOCSTRING_CHARS, stdlib_docstrings

    return sorted({" ".join(doc.split()) for doc in stdlib_docstrings()
                   if 80 <= len(doc) < MIN_DOCSTRING_CHARS})


def word_order_examples(count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    docs = _short_docstrings()
    rng.shuffle(docs)
    examples: list[Example] = []
    for doc in docs:
        if len(examples) == count:
            break
        sentences = re.split(r"(?<=[.!?]) +", doc)
        words = sentences[-1].split()
        if len(sentences) < 2 or not 5 <= len(words) <= 25:
            continue
        target, others = " ".join(words), set()
        for _ in range(50):
            order = words[:]
            rng.shuffle(order)
            if " ".join(order) != target:
                others.add(" ".join(order))
            if len(others) == 3:
                break
        if len(others) < 3:
            continue
        choices = [target] + sorted(others)
        rng.shuffle(choices)
        examples.append(Example(" ".join(sentences[:-1]), choices, choices.index(target),
                                {"docstring": doc}))
    return examples


EMBEDDED = {
    "demo_arithmetic": (arithmetic_examples, " ", "held-out demo-corpus word problems"),
    "demo_code": (code_examples, "", "next-line cloze over unsampled standard-library files"),
    "demo_arithmetic_gen": (arithmetic_generation_examples, " ",
                            "held-out demo-corpus word problems, solved by free generation"),
    "demo_word_order": (word_order_examples, " ",
                        "held-out standard-library docstrings: the last sentence or a shuffle"),
}
GENERATIVE = {"demo_arithmetic_gen": r"The answer is (-?[0-9]+)"}


class GeneratedTask(Task):
    def __init__(self, name: str):
        generate, delimiter, source = EMBEDDED[name]
        if name in GENERATIVE:
            spec = TaskSpec(name=name, formulation="fg", data_files="(generated)", source=source,
                            answer="(generated)", max_gen_tokens=64,
                            answer_pattern=GENERATIVE[name])
        else:
            spec = TaskSpec(name=name, data_files="(generated)", target_delimiter=delimiter,
                            source=source, chance=0.25)
        super().__init__(spec, Path("."))
        self._generate = generate

    def examples(self) -> list[Example]:
        if getattr(self, "_examples", None) is None:
            self._examples = self._generate(COUNT, SEED)
        return self._examples

    def fewshot_pool(self) -> list[Example]:
        if getattr(self, "_pool", None) is None:
            self._pool = self._generate(50, SEED + 7)
        return self._pool

    def source(self) -> dict:
        return {"origin": "generated", "data": f"megasmol (generated: {self.spec.source})",
                "split": "generated", "fewshot_split": "generated", "formulation": self.spec.formulation,
                "available": COUNT}


def embedded_task(name: str) -> Task:
    return GeneratedTask(name)
