"""Score a model on tasks: build every request, run them in one batched pass, judge, write.

Outputs (in ``--out``): ``results.json`` (per task: each metric, its standard error, the example
count, the chance level) and ``samples.jsonl`` (per example: prompt, continuations,
log-likelihoods, prediction, gold), both written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmol.eval.code_exec import execute, judge_program
from megasmol.eval.formulations import (GENERATIVE, Scored, aggregate, cut_at_stop, judge,
                                        judge_generation, scoring_pairs)
from megasmol.eval.requests import GenerationRequest, encode_pair
from megasmol.eval.tasks import Task, sample
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

    def to_json(self) -> dict:
        return {"formulation": self.formulation, "examples": self.examples, "chance": self.chance,
                "num_fewshot": self.num_fewshot, "primary_metric": self.primary, "source": self.source,
                **{name: _finite(value) for name, (value, _) in self.metrics.items()},
                **{f"{name}_stderr": _finite(err) for name, (_, err) in self.metrics.items()}}


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


def evaluate(tasks: list[Task], scorer, *, limit: Optional[int] = None, num_fewshot: int = 0,
             seed: int = 1234, progress_factory=None) -> list[TaskResult]:
    """Score ``tasks`` with ``scorer`` (see scorers.py); every request of every task goes
    through one batched pass so that lengths sort well."""
    plans = []
    for task in tasks:
        k = task.shots(num_fewshot)
        caps = [c for c in (limit, task.limit) if c is not None]
        examples = sample(task.examples(), min(caps) if caps else None, seed)
        pool = task.fewshot_pool() if k else []
        built = []
        for index, example in enumerate(examples):
            shots = _shots(task, pool, index, k, seed, example)
            prompt, pairs, shown = scoring_pairs(
                example, task.spec.formulation, task.spec.target_delimiter, shots,
                unconditional="acc_mutual_info" in task.spec.metrics)
            built.append((example, *_with_description(example.description, prompt, pairs), shown))
        plans.append((task, built, k))
    requests = [encode_pair(scorer.tokenizer, context, continuation)
                for _, built, _ in plans for _, _, pairs, _ in built for context, continuation in pairs]
    generations = [GenerationRequest(prompt, tuple(task.spec.until), task.spec.max_gen_tokens)
                   for task, built, _ in plans if task.spec.formulation in GENERATIVE
                   for _, prompt, _, _ in built]
    programs = sum(len(built) for task, built, _ in plans if task.spec.formulation == "code")
    progress = (progress_factory(len(requests) + len(generations) + programs)
                if progress_factory else None)
    try:
        lls = scorer.loglikelihoods(requests, progress) if requests else []
        texts = scorer.generations(generations, progress) if generations else []
        texts.reverse()
        completions = [[cut_at_stop(texts.pop(), task.spec.until) for _ in built]
                       if task.spec.formulation in GENERATIVE else None for task, built, _ in plans]
        outcomes = [execute(task, built, done, progress) if task.spec.formulation == "code" else None
                    for (task, built, _), done in zip(plans, completions)]
    finally:
        if progress is not None:
            progress.close()
    results, cursor = [], 0
    for (task, built, k), done, ran in zip(plans, completions, outcomes):
        scored = []
        for index, (example, prompt, pairs, shown) in enumerate(built):
            if task.spec.formulation == "fg":
                scored.append(judge_generation(index, example, prompt, done[index],
                                               task.spec.answer_pattern))
                continue
            if task.spec.formulation == "code":
                scored.append(judge_program(index, example, prompt, done[index], ran[index]))
                continue
            scored.append(judge(index, example, task.spec.formulation, prompt, shown,
                                lls[cursor:cursor + len(pairs)],
                                [len(r.continuation) for r in requests[cursor:cursor + len(pairs)]],
                                tuple(task.spec.metrics)))
            cursor += len(pairs)
        chance = task.spec.chance
        if chance is None and task.spec.formulation not in ("bpb", "fg", "code") and built:
            chance = sum(1 / len(e.choices) for e, _, _, _ in built) / len(built)
        results.append(TaskResult(task.name, task.spec.formulation, aggregate(scored, task.spec.formulation)
                                  if scored else {}, len(scored), chance, k, scored, task.source(),
                                  task.metric or task.spec.primary))
    return results


def table(results: list[TaskResult]) -> str:
    rows = [("task", "metric", "value", "stderr", "n", "chance")]
    for r in results:
        for name, (value, err) in r.metrics.items():
            rows.append((r.name, name, f"{value:.4f}", "-" if not math.isfinite(err) else f"{err:.4f}",
                         str(r.examples), _chance(r, name)))
    return format_table(rows)


def _chance(result: TaskResult, metric: str) -> str:
    """Chance is an accuracy: a log-likelihood or exact-match-free metric has none to show."""
    if result.chance is None or not metric.startswith("acc"):
        return "-"
    return f"{result.chance:.4f}"


def write_outputs(results: list[TaskResult], out_dir: Path, model: str,
                  settings: dict, suites: list = ()) -> tuple[Path, Path]:
    """``suites``: ``suites.SuiteResult`` of the suites asked for (their averages)."""
    from megasmol.utils.fs import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"model": model, "settings": settings, "results": {r.name: r.to_json() for r in results}}
    if suites:
        doc["suites"] = {s.name: s.to_json() for s in suites}
    results_path, samples_path = out_dir / "results.json", out_dir / "samples.jsonl"
    lines = []
    for r in results:
        for s in r.samples:
            lines.append(json.dumps({"task": r.name, "index": s.index, "prompt": s.prompt,
                                     "continuations": s.continuations,
                                     "loglikelihoods": s.loglikelihoods, "gold": s.gold,
                                     "prediction": s.prediction, "prediction_norm": s.prediction_norm,
                                     **({"result" if r.formulation == "code" else "extracted": s.extracted}
                                        if s.extracted is not None else {}),
                                     **({"unconditional_loglikelihoods": s.unconditional}
                                        if s.unconditional is not None else {}),
                                     **s.metrics}))
    atomic_write_text(samples_path, "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(results_path, json.dumps(doc, indent=2))
    return results_path, samples_path
