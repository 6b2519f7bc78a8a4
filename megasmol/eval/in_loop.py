"""Downstream evaluation inside the training loop: the training model itself, in its layout.

The loop's ``train.callbacks.downstream.DownstreamCallback`` calls :meth:`InLoopEvaluation.run`
every ``eval.tasks_interval`` steps, or at every checkpoint with ``eval.tasks_at_checkpoint``.
It is ``megasmol eval tasks``
(the same task loading, requests, few-shot draws and judging, ``runner.evaluate``) with the
training model as the scorer (``parallel_scorer.PipelineScorer``: forward-only through the
pipeline schedule in any TP / PP / CP / DP layout, greedy generation for free-generation tasks),
so the numbers equal the offline command on the checkpoint of that step. It never changes the
training: no gradients, no optimizer state, no RNG draws.
"""

from __future__ import annotations

import math

from megasmol.config.typed import ConfigError
from megasmol.eval.parallel_scorer import PipelineScorer
from megasmol.eval.runner import TaskResult, evaluate, write_outputs
from megasmol.eval.suites import expand, summarize
from megasmol.runtime.run_dir import RunDir


class InLoopEvaluation:
    def __init__(self, config, spec, tokenizer_dir):
        settings = config.eval
        self.interval, self.at_checkpoint = settings.tasks_interval, settings.tasks_at_checkpoint
        self.limit, self.seed = settings.tasks_limit, config.training.seed
        self.num_fewshot = settings.tasks_num_fewshot
        self.micro, self.spec = config.training.micro_batch_size, spec
        if tokenizer_dir is None:
            raise ConfigError("eval.tasks needs a tokenizer: set data.tokenizer")
        from megasmol.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.tasks, self.suites = expand([_resolved(config, name) for name in settings.tasks])
        for task in self.tasks:  # read (and check) every task file now, not at the first evaluation
            task.examples()
            # More than k: a question never shows itself, and a split may hold the question.
            k = task.shots(self.num_fewshot)
            if k and len(task.fewshot_pool()) <= k:
                raise ConfigError(f"eval.tasks_num_fewshot={k}: task {task.name}'s "
                                  f"few-shot split has {len(task.fewshot_pool())} examples; it "
                                  "needs more")

    def run(self, setup) -> list[TaskResult]:
        """Collective: every rank calls it; every rank returns the same results."""
        scorer = PipelineScorer(setup.model, setup.ddp_model, micro_batch_size=self.micro,
                                max_length=self.spec.max_position_embeddings,
                                vocab_size=self.spec.vocab_size, tokenizer=self.tokenizer,
                                name="eval.tasks")
        return evaluate(self.tasks, scorer, limit=self.limit, num_fewshot=self.num_fewshot,
                        seed=self.seed)

    def write(self, step: int, results: list[TaskResult], run_dir) -> None:
        """``RUN_DIR/downstream/iter_STEP/``: results.json and samples.jsonl, as the offline
        command writes them (what the model saw and answered at that step)."""
        from pathlib import Path

        settings = {"tasks": [t.name for t in self.tasks], "limit": self.limit,
                    "num_fewshot": self.num_fewshot, "seed": self.seed, "step": step}
        write_outputs(results, RunDir(Path(run_dir)).downstream(step),
                      f"training model at step {step}", settings, summarize(self.suites, results))

    def record(self, step: int, results: list[TaskResult]) -> dict:
        """``TASK/METRIC`` (and ``_stderr``, ``TASK/chance``) per task, ``SUITE/average`` per suite."""
        record = {"step": step}
        for r in results:
            for name, (value, err) in r.metrics.items():
                record[f"{r.name}/{name}"] = value
                record[f"{r.name}/{name}_stderr"] = err if math.isfinite(err) else None
            if r.chance is not None:
                record[f"{r.name}/chance"] = r.chance
        for suite in summarize(self.suites, results):
            record[f"{suite.name}/average"] = suite.average
            record[f"{suite.name}/average_stderr"] = suite.stderr if math.isfinite(suite.stderr) else None
        return record

    def line(self, step: int, results: list[TaskResult]) -> str:
        parts = [f"{r.name} " + " ".join(f"{k} {v:.4f}" for k, (v, _) in r.metrics.items())
                 for r in results]
        parts += [f"{s.name} average {s.average:.4f}" for s in summarize(self.suites, results)]
        return f"downstream at step {step}: " + " | ".join(parts)


def _resolved(config, name: str) -> str:
    candidate = config.path(name)
    return str(candidate) if candidate.exists() else name

