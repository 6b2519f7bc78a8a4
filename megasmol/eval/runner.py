"""Score a model on tasks: build every request, run them in one batched pass, judge.

Each task's formulation (``formulations/``) builds its requests and judges the answers; the
runner only batches them: every log-likelihood request of every task in one pass, then every
generation, then every program a formulation runs. Progress: one bar per phase (scoring,
generation, code execution), the generation one with tokens generated and tokens/s. The results
are written by ``outputs.py``.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Optional

from megasmol.eval.formulations.base import Answer, Scored
from megasmol.eval.scoring.gen_progress import GenerationProgress
from megasmol.eval.scoring.requests import GenerationRequest, encode_pair
from megasmol.eval.tasks.task import Task, sample
from megasmol.utils.table import format_table


@dataclass
class TaskResult:
    name: str
    formulation: str
    metrics: dict[str, tuple[float, float]]
    examples: int
    chance: Optional[float]
    num_fewshot: int
    samples: list[Scored] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    """Where the examples came from (Task.source): data and version, split, few-shot split."""
    primary: str = "acc"
    """The metric suites average."""
    truncated: Optional[int] = None
    """Generative tasks: how many generations reached ``max_gen_tokens`` with no stop string or
    EOS (their text is cut there); None for the others."""
    max_gen_tokens: Optional[int] = None

    def to_json(self) -> dict:
        generated = {} if self.truncated is None else {
            "max_gen_tokens": self.max_gen_tokens, "truncated": self.truncated,
            "truncated_fraction": self.truncated / self.examples if self.examples else None}
        return {"formulation": self.formulation, "examples": self.examples, "chance": self.chance,
                "num_fewshot": self.num_fewshot, "primary_metric": self.primary, "source": self.source,
                **{name: _finite(value) for name, (value, _) in self.metrics.items()},
                **{f"{name}_stderr": _finite(err) for name, (_, err) in self.metrics.items()},
                **generated}


def _finite(value: float):
    return value if math.isfinite(value) else None


def _shots(task: Task, pool, index: int, k: int, seed: int, example):
    if k == 0:
        return []
    # Never the question itself; only its own subset's (MMLU: the subject's dev questions).
    candidates = [e for e in pool if e.record != example.record and e.subset == example.subset]
    if len(candidates) < k:
        from megasmol.config.typed import ConfigError

        raise ConfigError(f"task {task.name}: {k} few-shot examples asked, the few-shot split has "
                          f"{len(candidates)}" + (f" for {example.subset}" if example.subset else ""))
    if task.spec.fewshot_sampler == "first_n":
        return candidates[:k]
    return random.Random(f"{seed}/{task.name}/{index}").sample(candidates, k)


def _with_description(description: str, prompt: str, pairs: list) -> tuple[str, list]:
    """lm-eval's description goes first; an unconditional request (empty context) stays empty."""
    if not description:
        return prompt, pairs
    return description + prompt, [(description + c if c else c, k) for c, k in pairs]


@contextlib.contextmanager
def _phase(progress_factory, total: int, description: str, unit: str):
    """A progress bar for one phase of the evaluation, closed when it ends (None: no bar)."""
    bar = progress_factory(total, description, unit) if progress_factory and total else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def evaluate(tasks: list[Task], scorer, *, limit: Optional[int] = None, num_fewshot: int = 0,
             seed: int = 1234, progress_factory=None) -> list[TaskResult]:
    """Score ``tasks`` with ``scorer`` (an ``api.Scorer``); every request of every task goes
    through one batched pass so that lengths sort well. Each task's formulation builds its
    requests and judges the answers. ``progress_factory(total, description, unit)`` makes a tqdm
    bar for each phase."""
    plans = []
    for task in tasks:
        k = task.shots(num_fewshot)
        caps = [c for c in (limit, task.limit) if c is not None]
        examples = sample(task.examples(), min(caps) if caps else None, seed)
        pool = task.fewshot_pool() if k else []
        built, kind = [], task.formulation
        for index, example in enumerate(examples):
            shots = _shots(task, pool, index, k, seed, example)
            prompt, pairs, shown = kind.build(example, task.spec, shots)
            built.append((example, *_with_description(example.description, prompt, pairs), shown))
        plans.append((task, built, k))
    requests = [encode_pair(scorer.tokenizer, context, continuation)
                for _, built, _ in plans for _, _, pairs, _ in built for context, continuation in pairs]
    generations = [GenerationRequest(prompt, tuple(task.spec.until), task.spec.max_gen_tokens, task.name)
                   for task, built, _ in plans if task.formulation.generative
                   for _, prompt, _, _ in built]
    programs = sum(len(built) for task, built, _ in plans if task.formulation.runs_programs)
    with _phase(progress_factory, len(requests), "score", "req") as bar:
        lls = scorer.loglikelihoods(requests, bar) if requests else []
    with _phase(progress_factory, len(generations), "generate", "prompt") as bar:
        made = (scorer.generations(generations, GenerationProgress(bar, len(generations)))
                if generations else [])
    made.reverse()
    generated = [[made.pop() for _ in built] if task.formulation.generative else None
                 for task, built, _ in plans]
    completions = [None if gens is None else [task.formulation.completion(g.text, task.spec) for g in gens]
                   for (task, _, _), gens in zip(plans, generated)]
    outcomes: list[Optional[list]] = []
    with _phase(progress_factory, programs, "execute", "program") as bar:
        for (task, built, _), done in zip(plans, completions):
            if not task.formulation.runs_programs:
                outcomes.append(None)
                continue
            if done is None:  # runs_programs formulations are generative
                raise TypeError(f"task {task.name}: formulation {task.spec.formulation} runs "
                                "programs but generated nothing")
            outcomes.append(task.formulation.execute(task, built, done, bar))
    results, cursor = [], 0
    for (task, built, k), done, ran, gens in zip(plans, completions, outcomes, generated):
        scored, kind = [], task.formulation
        for index, (example, prompt, pairs, shown) in enumerate(built):
            answer = Answer(lls[cursor:cursor + len(pairs)],
                            [len(r.continuation) for r in requests[cursor:cursor + len(pairs)]],
                            None if gens is None else gens[index],
                            None if done is None else done[index],
                            None if ran is None else ran[index])
            scored.append(kind.judge(index, example, prompt, shown, answer, task.spec))
            cursor += len(pairs)
        chance = task.spec.chance
        if chance is None and task.formulation.has_chance and built:
            chance = sum(1 / len(e.choices) for e, _, _, _ in built) / len(built)
        truncated = None if gens is None else sum(g.truncated for g in gens)
        results.append(TaskResult(task.name, task.spec.formulation,
                                  task.formulation.aggregate(scored) if scored else {}, len(scored),
                                  chance, k, scored, task.source(), task.metric or task.spec.primary,
                                  truncated, None if gens is None else task.spec.max_gen_tokens))
    return results


def table(results: list[TaskResult]) -> str:
    """One row per task and metric; with a generative task, a ``truncated`` column (generations
    cut at ``max_gen_tokens``, of all) and a line saying what it means."""
    generative = any(r.truncated is not None for r in results)
    rows = [("task", "metric", "value", "stderr", "n", "chance") + (("truncated",) if generative else ())]
    for r in results:
        for name, (value, err) in r.metrics.items():
            row = (r.name, name, f"{value:.4f}", "-" if not math.isfinite(err) else f"{err:.4f}",
                   str(r.examples), _chance(r, name))
            rows.append(row + ((_truncated(r),) if generative else ()))
    if not generative:
        return format_table(rows)
    return (format_table(rows) + "\ntruncated: generations cut at max_gen_tokens with no stop "
            "string or EOS (early models often never stop)")


def _truncated(result: TaskResult) -> str:
    return "-" if result.truncated is None else f"{result.truncated}/{result.examples}"


def _chance(result: TaskResult, metric: str) -> str:
    """Chance is an accuracy: a log-likelihood or exact-match-free metric has none to show."""
    if result.chance is None or not metric.startswith("acc"):
        return "-"
    return f"{result.chance:.4f}"
