"""Score a model on tasks: build every request, run them in one batched pass, judge, write.

Outputs (in ``--out``): ``results.json`` (per task: each metric, its standard error, the example
count, the chance level; for generative tasks, how many generations were cut at ``max_gen_tokens``)
and ``samples.jsonl`` (per example: prompt, continuations, log-likelihoods, prediction, gold), both
written to a temporary name and renamed when complete. Progress: one bar per phase (scoring,
generation, code execution), the generation one with tokens generated and tokens/s.
``megasmol eval tasks`` writes them to a new ``OUT/MODEL/TIMESTAMP/`` (:func:`write_new_outputs`),
never over an earlier evaluation's; into ``OUT`` itself only with ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmol.eval.code_exec import execute, judge_program
from megasmol.eval.gen_progress import GenerationProgress
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
    """Score ``tasks`` with ``scorer`` (see scorers.py); every request of every task goes
    through one batched pass so that lengths sort well. ``progress_factory(total, description,
    unit)`` makes a tqdm bar for each phase."""
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
    generations = [GenerationRequest(prompt, tuple(task.spec.until), task.spec.max_gen_tokens, task.name)
                   for task, built, _ in plans if task.spec.formulation in GENERATIVE
                   for _, prompt, _, _ in built]
    programs = sum(len(built) for task, built, _ in plans if task.spec.formulation == "code")
    with _phase(progress_factory, len(requests), "score", "req") as bar:
        lls = scorer.loglikelihoods(requests, bar) if requests else []
    with _phase(progress_factory, len(generations), "generate", "prompt") as bar:
        made = (scorer.generations(generations, GenerationProgress(bar, len(generations)))
                if generations else [])
    made.reverse()
    generated = [[made.pop() for _ in built] if task.spec.formulation in GENERATIVE else None
                 for task, built, _ in plans]
    completions = [None if gens is None else [cut_at_stop(g.text, task.spec.until) for g in gens]
                   for (task, _, _), gens in zip(plans, generated)]
    with _phase(progress_factory, programs, "execute", "program") as bar:
        outcomes = [execute(task, built, done, bar) if task.spec.formulation == "code" else None
                    for (task, built, _), done in zip(plans, completions)]
    results, cursor = [], 0
    for (task, built, k), done, ran, gens in zip(plans, completions, outcomes, generated):
        scored = []
        for index, (example, prompt, pairs, shown) in enumerate(built):
            if task.spec.formulation == "fg":
                scored.append(judge_generation(index, example, prompt, done[index],
                                               task.spec.answer_pattern))
                scored[-1].truncated = gens[index].truncated
                continue
            if task.spec.formulation == "code":
                scored.append(judge_program(index, example, prompt, done[index], ran[index]))
                scored[-1].truncated = gens[index].truncated
                continue
            scored.append(judge(index, example, task.spec.formulation, prompt, shown,
                                lls[cursor:cursor + len(pairs)],
                                [len(r.continuation) for r in requests[cursor:cursor + len(pairs)]],
                                tuple(task.spec.metrics)))
            cursor += len(pairs)
        chance = task.spec.chance
        if chance is None and task.spec.formulation not in ("bpb", "fg", "code") and built:
            chance = sum(1 / len(e.choices) for e, _, _, _ in built) / len(built)
        truncated = None if gens is None else sum(g.truncated for g in gens)
        results.append(TaskResult(task.name, task.spec.formulation, aggregate(scored, task.spec.formulation)
                                  if scored else {}, len(scored), chance, k, scored, task.source(),
                                  task.metric or task.spec.primary, truncated,
                                  None if gens is None else task.spec.max_gen_tokens))
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
                                     **({"truncated": s.truncated} if s.truncated is not None else {}),
                                     **s.metrics}))
    atomic_write_text(samples_path, "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(results_path, json.dumps(doc, indent=2))
    return results_path, samples_path


def model_dirname(model: str) -> str:
    """The per-model directory name, as lm-eval makes it from the model's name: the path (relative
    to the current directory when beneath it) with ``/`` and the characters a file name cannot
    hold replaced by ``__`` (``runs/demo/hf`` -> ``runs__demo__hf``)."""
    from megasmol.utils.fs import shown

    name = re.sub(r"[\"<>:/|\\?*\[\]\s]+", "__", shown(model).strip("/")).strip("_")
    if name in ("", ".", ".."):
        name = Path(model).resolve().name or "model"
    return name[:200]


def write_new_outputs(results: list[TaskResult], out: Path, model: str, settings: dict,
                      suites: list = (), now: Optional[datetime] = None) -> tuple[Path, Path]:
    """``megasmol eval tasks``'s outputs, never replacing an earlier evaluation's (lm-eval's
    layout): :func:`write_outputs` into a new ``OUT/MODEL/TIMESTAMP/`` (``-2``, ``-3``... when
    one of that second exists), written as a hidden temporary directory beside it and renamed
    into place once both files are complete. ``--overwrite`` writes into ``OUT`` itself instead."""
    parent = Path(out) / model_dirname(model)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime("%Y-%m-%dT%H-%M-%S")
    staging = parent / f".{stamp}.tmp-{os.getpid()}"
    try:
        write_outputs(results, staging, model, settings, suites)
        for attempt in range(1, 1000):
            final = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
            if final.exists():
                continue
            try:
                os.rename(staging, final)  # refused if one was made meanwhile and holds files
            except OSError:
                continue
            return final / "results.json", final / "samples.jsonl"
        raise FileExistsError(f"{parent}: no free name for the results of {stamp}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
