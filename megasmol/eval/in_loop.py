"""Downstream evaluation inside the training loop: the training model itself, in its layout.

The loop's ``train.callbacks.downstream.DownstreamCallback`` calls :meth:`InLoopEvaluation.run`
every ``eval.tasks_interval`` steps, or at every checkpoint with ``eval.tasks_at_checkpoint``.
It is ``megasmol eval tasks`` (the same ``api.Evaluation``: task loading, requests, few-shot
draws, judging and suite averages, and the same ``outputs.write_report``) with the training
model as the scorer (``scoring.parallel_scorer.PipelineScorer``: forward-only through the
pipeline schedule in any TP / PP / CP / DP layout, greedy generation for free-generation tasks),
so the numbers and ``results.json`` equal the offline command's on the checkpoint of that step.
It never changes the training: no gradients, no optimizer state, no RNG draws.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError
from megasmol.eval.api import Evaluation, Report
from megasmol.eval.outputs import write_report
from megasmol.eval.scoring.parallel_scorer import PipelineScorer
from megasmol.runtime.run_dir import RunDir


class InLoopEvaluation:
    def __init__(self, config, spec, tokenizer_dir):
        settings = config.eval
        self.interval, self.at_checkpoint = settings.tasks_interval, settings.tasks_at_checkpoint
        self.micro, self.spec = config.training.micro_batch_size, spec
        if tokenizer_dir is None:
            raise ConfigError("eval.tasks needs a tokenizer: set data.tokenizer")
        from megasmol.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.evaluation = Evaluation([_resolved(config, name) for name in settings.tasks],
                                     limit=settings.tasks_limit,
                                     num_fewshot=settings.tasks_num_fewshot, seed=config.training.seed)
        self.evaluation.read()  # every task file read (and checked) now, not at the first evaluation
        for task in self.evaluation.tasks:
            # More than k: a question never shows itself, and a split may hold the question.
            k = task.shots(self.evaluation.num_fewshot)
            if k and len(task.fewshot_pool()) <= k:
                raise ConfigError(f"eval.tasks_num_fewshot={k}: task {task.name}'s "
                                  f"few-shot split has {len(task.fewshot_pool())} examples; it "
                                  "needs more")

    def run(self, setup) -> Report:
        """Collective: every rank calls it; every rank returns the same report."""
        scorer = PipelineScorer(setup.model, setup.ddp_model, micro_batch_size=self.micro,
                                max_length=self.spec.max_position_embeddings,
                                vocab_size=self.spec.vocab_size, tokenizer=self.tokenizer,
                                name="eval.tasks")
        return self.evaluation.run(scorer, model="training model")

    def write(self, step: int, report: Report, run_dir) -> None:
        """``RUN_DIR/downstream/iter_STEP/``: results.json and samples.jsonl, written as the
        offline command writes them (what the model saw and answered at that step)."""
        write_report(dataclasses.replace(report, model=f"training model at step {step}"),
                     RunDir(Path(run_dir)).downstream(step))

    def record(self, step: int, report: Report) -> dict:
        """``TASK/METRIC`` (and ``_stderr``, ``TASK/chance``) per task, ``SUITE/average`` per suite."""
        record: dict[str, Optional[float]] = {"step": step}
        for r in report.results:
            for name, (value, err) in r.metrics.items():
                record[f"{r.name}/{name}"] = value
                record[f"{r.name}/{name}_stderr"] = err if math.isfinite(err) else None
            if r.chance is not None:
                record[f"{r.name}/chance"] = r.chance
        for suite in report.suites:
            record[f"{suite.name}/average"] = suite.average
            record[f"{suite.name}/average_stderr"] = suite.stderr if math.isfinite(suite.stderr) else None
        return record

    def line(self, step: int, report: Report) -> str:
        parts = [f"{r.name} " + " ".join(f"{k} {v:.4f}" for k, (v, _) in r.metrics.items())
                 for r in report.results]
        parts += [f"{s.name} average {s.average:.4f}" for s in report.suites]
        return f"downstream at step {step}: " + " | ".join(parts)


def _resolved(config, name: str) -> str:
    candidate = config.path(name)
    return str(candidate) if candidate.exists() else name
