"""The names ``--tasks`` and ``eval.tasks`` accept: the built-in task definitions
(``task_defs/NAME.yaml``), the generated tasks (``embedded``) and the suites
(``task_defs/suites/NAME.yaml``), and how a name or a path becomes a ``Task``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megasmol.config.typed import ConfigError, from_dict, load_yaml
from megasmol.eval.tasks.embedded import EMBEDDED, embedded_task
from megasmol.eval.tasks.spec import TaskSpec
from megasmol.eval.tasks.task import Task, file_task

TASK_DIR = Path(__file__).resolve().parent / "task_defs"
SUITE_DIR = TASK_DIR / "suites"


def task_names() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def did_you_mean(given: str, known) -> str:
    """`` (did you mean 'hellaswag'?)`` for the name in ``known`` closest to ``given``
    (difflib), or nothing when none is close."""
    import difflib

    close = difflib.get_close_matches(given, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_task(name_or_path: str) -> Task:
    """A task file (.jsonl / .parquet), a task YAML path, or the name of a built-in definition;
    ``NAME:SUBSET`` is one subset of a task with subsets."""
    name, _, subset = name_or_path.partition(":") if not Path(name_or_path).exists() else (
        name_or_path, "", "")
    task = _load_whole(name)
    if subset:
        if subset not in task.spec.subsets:
            raise ConfigError(f"task {name} has no subset {subset!r}" + did_you_mean(
                subset, task.spec.subsets) + (
                f"; subsets: {', '.join(task.spec.subsets)}" if task.spec.subsets else ""))
        task._only = [subset]
        task.spec = dataclasses.replace(task.spec, name=f"{task.spec.name}:{subset}")
    return task


def _load_whole(name_or_path: str) -> Task:
    path = Path(name_or_path)
    if path.suffix in (".jsonl", ".parquet"):
        if not path.is_file():
            raise ConfigError(f"task file {path}: no such file")
        return file_task(path)
    if path.suffix not in (".yaml", ".yml"):
        if name_or_path in EMBEDDED:
            return embedded_task(name_or_path)
        path = TASK_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = task_names() + sorted(EMBEDDED)
            raise ConfigError(f"unknown task {name_or_path!r}"
                              + did_you_mean(name_or_path, known + suite_names())
                              + f"; built in: {', '.join(known)}, or a .jsonl/.yaml path")
    try:
        spec = from_dict(TaskSpec, load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return Task(spec, path.parent, path)


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def is_suite(name: str) -> bool:
    return name in suite_names() or name.endswith(".suite.yaml")
