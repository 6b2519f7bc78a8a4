"""Suites: a name for a set of tasks with their settings, scored together and averaged.

A suite is a YAML file in ``task_defs/suites/`` (or a user's path ending in ``.suite.yaml``). Each
entry names a task and its few-shot count, and whether the suite's per-task cap applies (the
playbook scores 1,000 questions per task, GSM8K and HumanEval in full). A suite reports each task
and the macro average of their primary metrics, with its standard error
(``sqrt(sum of the tasks' squared standard errors) / number of tasks``: the tasks are independent
samples). A task of the reference suite megasmol cannot score, and one whose data is neither
shipped nor reachable, is named as missing, never silently left out of the average's meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError, from_dict, load_yaml
from megasmol.eval.tasks.registry import SUITE_DIR, is_suite, load_task
from megasmol.eval.tasks.task import Task


@dataclass
class SuiteEntry:
    """One task of a suite."""

    task: str
    """A built-in task name (``NAME:SUBSET`` for one subset) or a task YAML path."""
    num_fewshot: int = 0
    """Few-shot examples for this task."""
    capped: bool = True
    """Whether the suite's ``limit`` applies (False: every example, as GSM8K and HumanEval)."""
    metric: Optional[str] = None
    """The metric averaged (default: the task's ``primary_metric``)."""

    def validate(self) -> None:
        if self.num_fewshot < 0:
            raise ConfigError(f"suite entry {self.task}: num_fewshot must be >= 0")


@dataclass
class SuiteSpec:
    """A named set of tasks (a YAML file in ``task_defs/suites/``)."""

    name: str
    """The name ``--tasks`` and ``eval.tasks`` accept."""
    description: str
    """What the suite is for, one paragraph."""
    source: str
    """Where its definition comes from (a URL or a citation)."""
    tasks: list[SuiteEntry]
    """The tasks scored."""
    limit: Optional[int] = None
    """At most this many examples per capped task (a seeded subset)."""
    missing: list[str] = field(default_factory=list)
    """Parts of the reference suite megasmol has no task for, each with the reason."""

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError(f"suite {self.name}: no tasks")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"suite {self.name}: limit must be >= 1")


@dataclass
class Suite:
    spec: SuiteSpec
    tasks: list[Task]
    missing: list[str]
    """The reference suite's missing parts and the entries whose data could not be read."""


def load_suite(name: str) -> Suite:
    path = Path(name) if name.endswith(".suite.yaml") else SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"suite {name}: {path}: no such file")
    try:
        spec = from_dict(SuiteSpec, load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    tasks, missing = [], list(spec.missing)
    for entry in spec.tasks:
        task = load_task(entry.task)  # a misspelt task name is an error, not a missing task
        try:
            task.examples()
        except ConfigError as exc:  # data neither shipped nor reachable: named, not averaged
            missing.append(f"{entry.task}: {exc}")
            continue
        task.num_fewshot, task.metric = entry.num_fewshot, entry.metric
        task.limit = spec.limit if entry.capped else None
        tasks.append(task)
    if not tasks:
        raise ConfigError(f"suite {spec.name}: no task of it can be read: " + "; ".join(missing))
    return Suite(spec, tasks, missing)


def expand(names: list[str]) -> tuple[list[Task], list[Suite]]:
    """Task and suite names -> the tasks to score (each once) and the suites to average. A task
    named on its own that a suite also holds is scored once, with the suite's settings; two
    suites that hold a task with different settings are refused."""
    held: dict[str, Task] = {}  # the suites' tasks, with their settings
    suites = {name: load_suite(name) for name in names if is_suite(name)}
    for suite in suites.values():
        for task in suite.tasks:
            known = held.setdefault(task.name, task)
            if (known.num_fewshot, known.limit, known.metric) != (task.num_fewshot, task.limit,
                                                                   task.metric):
                raise ConfigError(f"task {task.name} is in two suites with different settings "
                                  "(few-shot, cap or metric): score the suites in separate runs")
    tasks: dict[str, Task] = {}  # in the order the names came
    for name in names:
        for task in ([held[t.name] for t in suites[name].tasks] if name in suites else [load_task(name)]):
            tasks.setdefault(task.name, held.get(task.name, task))
    return list(tasks.values()), list(suites.values())


@dataclass
class SuiteResult:
    name: str
    average: float
    stderr: float
    scores: dict[str, tuple[str, float]]
    """task -> (metric, value)."""
    missing: list[str]
    chance: Optional[float] = None
    """The same average for guessing (when every averaged metric is an accuracy)."""

    def to_json(self) -> dict:
        return {"average": self.average, "average_stderr": _finite(self.stderr), "chance": self.chance,
                "tasks": {t: {"metric": m, "value": v} for t, (m, v) in self.scores.items()},
                "missing": self.missing}


def _finite(value: float):
    return value if math.isfinite(value) else None


def summarize(suites: list[Suite], results) -> list[SuiteResult]:
    """Each suite's macro average over its tasks' results (``runner.TaskResult``)."""
    by_name = {r.name: r for r in results}
    out = []
    for suite in suites:
        scores, errors, chances = {}, [], []
        for task in suite.tasks:
            result = by_name[task.name]
            metric = task.metric or task.spec.primary
            if metric not in result.metrics:
                raise ConfigError(f"suite {suite.spec.name}: task {task.name} reports no {metric} "
                                  f"(it reports {', '.join(result.metrics)})")
            value, err = result.metrics[metric]
            scores[task.name] = (metric, value)
            errors.append(err)
            chances.append(result.chance if metric.startswith("acc") else None)
        average = sum(v for _, v in scores.values()) / len(scores)
        stderr = math.sqrt(sum(e * e for e in errors)) / len(errors)
        chance = None if None in chances else sum(c for c in chances if c is not None) / len(chances)
        out.append(SuiteResult(suite.spec.name, average, stderr, scores, suite.missing, chance))
    return out


def suite_table(summaries: list[SuiteResult]) -> str:
    from megasmol.utils.table import format_table

    rows = [("suite", "tasks", "macro average", "stderr", "chance", "missing")]
    for s in summaries:
        rows.append((s.name, str(len(s.scores)), f"{s.average:.4f}",
                     "-" if not math.isfinite(s.stderr) else f"{s.stderr:.4f}",
                     "-" if s.chance is None else f"{s.chance:.4f}",
                     ", ".join(m.split(":")[0] for m in s.missing) or "-"))
    return format_table(rows)
