"""What the rest of megasmol uses of the evaluation: the ``Scorer`` protocol every model backend
implements, and ``Evaluation``: task and suite names -> one ``Report`` (suites expanded, examples
read, every request scored through one scorer, suites summarized once). ``megasmol eval tasks``
and the training loop both run one and write its report with ``outputs.write_report``, so the
same model and tasks give the same ``results.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

from megasmol.eval.runner import TaskResult, evaluate, table
from megasmol.eval.scoring.requests import Generation, GenerationRequest, TokenRequest
from megasmol.eval.tasks.suites import Suite, SuiteResult, expand, suite_table, summarize
from megasmol.eval.tasks.task import Task


@runtime_checkable
class Scorer(Protocol):
    """A model as the runner sees it: ``scoring.scorers.ProcessScorer`` (one process, Megatron-Core
    or transformers) and ``scoring.parallel_scorer.PipelineScorer`` (any TP / PP / CP / DP layout,
    a collective) implement it."""

    tokenizer: object
    """Encodes the requests (and decodes generations)."""
    name: str
    """The model, in error messages."""

    def loglikelihoods(self, requests: list[TokenRequest], progress=None) -> list[float]:
        """``sum log p(continuation | context)`` per request, in request order; ``progress``
        (a tqdm bar or None) advanced by the requests scored."""
        ...

    def generations(self, requests: list[GenerationRequest], progress=None) -> list[Generation]:
        """The greedy generation after each prompt, in request order; ``progress``: a
        ``scoring.gen_progress.GenerationProgress``."""
        ...


@dataclass
class Report:
    """One evaluation's outcome: what ``results.json`` and ``samples.jsonl`` hold."""

    model: str
    """The model scored, as results.json names it (a path, or the training model at a step)."""
    settings: dict
    """The tasks scored (suites expanded), the suites averaged, limit, few-shot count and seed."""
    results: list[TaskResult]
    suites: list[SuiteResult] = field(default_factory=list)
    """Each suite's macro average over its tasks (summarized once, when the report is made)."""

    def table(self) -> str:
        """The tasks' table, each non-reference split's note, then the suites' table."""
        lines = [table(self.results)]
        lines += [f"note: {r.name}: {r.source['note']}" for r in self.results if r.source.get("note")]
        if self.suites:
            lines.append(suite_table(self.suites))
        return "\n".join(lines)


class Evaluation:
    """Task and suite names scored with one set of settings. ``names``: built-in task or suite
    names, task YAML, suite YAML or JSONL paths (a misspelt name is refused here, before any model
    loads)."""

    def __init__(self, names: list[str], *, limit: Optional[int] = None, num_fewshot: int = 0,
                 seed: int = 1234):
        self.limit, self.num_fewshot, self.seed = limit, num_fewshot, seed
        self.tasks: list[Task]
        self.suites: list[Suite]
        self.tasks, self.suites = expand(names)

    def read(self) -> None:
        """Read (and check) every task's examples now, not once the model is loaded: data that
        cannot be read (a bad row, an offline hub dataset) is one line."""
        for task in self.tasks:
            task.examples()

    @property
    def settings(self) -> dict:
        return {"tasks": [t.name for t in self.tasks], "suites": [s.spec.name for s in self.suites],
                "limit": self.limit, "num_fewshot": self.num_fewshot, "seed": self.seed}

    def run(self, scorer: Scorer, *, model: str, progress_factory=None) -> Report:
        """Score every task through ``scorer`` (collective when the scorer is) and summarize the
        suites. ``progress_factory(total, description, unit)``: a progress bar per phase."""
        results = evaluate(self.tasks, scorer, limit=self.limit, num_fewshot=self.num_fewshot,
                           seed=self.seed, progress_factory=progress_factory)
        return Report(model, self.settings, results, summarize(self.suites, results))
