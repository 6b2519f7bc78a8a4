"""Task definitions as data, and the examples they yield.

A task is either a file of items (``--tasks path/to/items.jsonl``: one ``{"context", "choices",
"gold"}`` per line, scored as cloze with each choice appended to the context exactly as written)
or a YAML definition (``megasmol/eval/task_defs/NAME.yaml``, or a user's YAML path) that says
where the examples come from and how a record becomes a context, choices and a gold index, with
Jinja templates over the record's fields (as lm-evaluation-harness's task YAMLs do).

Examples are read from local JSONL / Parquet files (``data_files``), or through the ``datasets``
library (``hf_dataset``) when the machine can reach the hub; nothing is read at import time.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megasmol.config.typed import ConfigError, from_dict, load_yaml

TASK_DIR = Path(__file__).resolve().parent / "task_defs"


@dataclass
class Example:
    context: str
    choices: list[str]
    gold: int
    record: dict = field(default_factory=dict)


@dataclass
class TaskSpec:
    """One evaluation task (a YAML file in ``task_defs/`` or a user's)."""

    name: str
    """Task name in results.json and the table."""
    formulation: Literal["cf", "mcf", "bpb", "fg", "partial"] = "cf"
    """cf: each choice's log-likelihood after the context (acc, acc_norm); mcf: choices listed
    with letters, the answer letter scored (acc); bpb: bits per byte of the gold choice; fg: free
    generation (greedy, KV cache) scored by exact match of the extracted answer; partial: each
    choice is a context and ``context`` renders the continuation scored after every one of them
    (WinoGrande; acc)."""
    answer: Optional[str] = None
    """fg: Jinja template that renders the reference answer (instead of choices and gold)."""
    until: list[str] = field(default_factory=lambda: ["\n\n", "Question:"])
    """fg: generation stops at the first of these strings (and at the tokenizer's EOS)."""
    max_gen_tokens: int = 256
    """fg: at most this many generated tokens."""
    answer_pattern: str = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
    """fg: regular expression for the answer in the generation; the last match counts (lm-eval's
    GSM8K "flexible-extract")."""
    source: str = ""
    """Where the examples come from, for the reader: a URL or a citation."""
    data_files: Optional[str] = None
    """Local JSONL or Parquet file with the examples (relative to the YAML file)."""
    hf_dataset: Optional[list[str]] = None
    """``[path, config]`` or ``[path]`` for ``datasets.load_dataset`` (needs the hub)."""
    split: str = "test"
    """Split scored (``datasets`` only; a local file is one split)."""
    fewshot_split: Optional[str] = None
    """Split the few-shot examples are drawn from (``datasets``), or a local file path."""
    context: str = "{{context}}"
    """Jinja template: the text before the answer."""
    choices: str = "{{choices}}"
    """Jinja template that renders a list (of strings), or a field holding one."""
    gold: str = "{{gold}}"
    """Jinja template that renders the index of the right choice."""
    target_delimiter: str = " "
    """Put between the context and each choice (lm-eval's ``target_delimiter``; file tasks: "")."""
    fewshot_delimiter: str = "\n\n"
    """Between few-shot examples."""
    metrics: list[str] = field(default_factory=lambda: ["acc", "acc_norm"])
    """cf: the accuracies to report: ``acc``, ``acc_norm`` (per character), ``acc_bytes`` (per
    UTF-8 byte), ``acc_per_token`` (per continuation token, OLMES) and ``acc_mutual_info`` (PMI:
    minus the choice's unconditional log-likelihood; one more request per choice)."""
    chance: Optional[float] = None
    """Accuracy of guessing (default 1 / number of choices, averaged over examples)."""
    replacements: list[list[str]] = field(default_factory=list)
    """``[pattern, replacement]`` regular-expression substitutions applied, in order, to the
    rendered context and choices after stripping them (lm-eval's HellaSwag preprocessing is
    three of these)."""

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("task name is empty")
        if self.data_files is None and self.hf_dataset is None:
            raise ConfigError(f"task {self.name}: give data_files (local) or hf_dataset")
        if (self.formulation == "fg") != (self.answer is not None):
            raise ConfigError(f"task {self.name}: answer is for (and required by) formulation fg")
        from megasmol.eval.formulations import CF_METRICS

        unknown = sorted(set(self.metrics) - set(CF_METRICS))
        if unknown or not self.metrics:
            raise ConfigError(f"task {self.name}: metrics {unknown or '[]'}: choose from "
                              f"{', '.join(CF_METRICS)}")
        if self.formulation != "cf" and self.metrics != ["acc", "acc_norm"]:
            raise ConfigError(f"task {self.name}: metrics is for formulation cf; "
                              f"{self.formulation} reports its own")
        if self.max_gen_tokens < 1:
            raise ConfigError(f"task {self.name}: max_gen_tokens must be >= 1")
        for i, pair in enumerate(self.replacements):
            if len(pair) != 2:
                raise ConfigError(f"task {self.name}: replacements[{i}] must be [pattern, replacement]")
        for what, pattern in [("answer_pattern", self.answer_pattern)] + [
                (f"replacements[{i}]", pair[0]) for i, pair in enumerate(self.replacements)]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"task {self.name}: {what}: {exc}") from None

    def clean(self, text: str) -> str:
        if not self.replacements:
            return text
        text = text.strip()
        for pattern, replacement in self.replacements:
            text = re.sub(pattern, replacement, text)
        return text


_FIELD = re.compile(r"^\{\{\s*([A-Za-z_][\w.]*)\s*\}\}$")


def _render(template: str, record: dict, what: str, task: str):
    """A template that is one field reference returns the field's value (a list stays a list);
    anything else renders to a string."""
    import jinja2

    field_ref = _FIELD.match(template.strip())
    if field_ref:
        value = record
        for key in field_ref.group(1).split("."):
            if not isinstance(value, dict) or key not in value:
                raise ConfigError(f"task {task}: the {what} field {field_ref.group(1)!r} is missing")
            value = value[key]
        return value
    try:
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        return env.from_string(template).render(**record)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"task {task}: {what} template {template!r}: {exc}") from None


def _as_list(value, task: str) -> list[str]:
    if isinstance(value, str):
        import ast

        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"task {task}: choices render to {value!r}, not a list") from None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
        raise ConfigError(f"task {task}: choices must be a non-empty list of strings, got {value!r}")
    return list(value)


def _read_records(path: Path, task: str) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"task {task}: {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: no examples")
    return records


class Task:
    def __init__(self, spec: TaskSpec, base_dir: Path, definition: Optional[Path] = None):
        self.spec, self.base_dir = spec, base_dir
        self.definition = definition
        """The task's YAML file, when it has one (named in errors: it is what a user edits)."""

    @property
    def name(self) -> str:
        return self.spec.name

    def _records(self, split: Optional[str], local: Optional[str]) -> list[dict]:
        if local is not None:
            path = Path(local)
            return _read_records(path if path.is_absolute() else self.base_dir / path, self.name)
        from megasmol.utils.hub import require_hub

        require_hub(f"task {self.name} ({'/'.join(self.spec.hf_dataset)}, split {split})",
                    f"download it once where there is a network and set data_files in a copy of "
                    f"the task YAML ({self.definition or self.base_dir})")
        import datasets

        try:
            data = datasets.load_dataset(*self.spec.hf_dataset, split=split)
        except Exception as exc:  # offline, unknown dataset, ...
            raise ConfigError(f"task {self.name}: cannot load {self.spec.hf_dataset} split {split} "
                              f"({type(exc).__name__}: {exc}); offline, download it once and set "
                              "data_files in a copy of the task YAML") from None
        return list(data)

    def examples(self) -> list[Example]:
        """Every example of the scored split (read once, then kept)."""
        if getattr(self, "_examples", None) is None:
            self._examples = self._read_examples()
        return self._examples

    def fewshot_pool(self) -> list[Example]:
        """The examples few-shot prompts draw from (read once, then kept)."""
        if getattr(self, "_pool", None) is None:
            self._pool = self._read_pool()
        return self._pool

    def _read_examples(self) -> list[Example]:
        return [self._example(r, i, self.spec.data_files) for i, r in
                enumerate(self._records(self.spec.split, self.spec.data_files))]

    def _read_pool(self) -> list[Example]:
        source = self.spec.fewshot_split
        if source is None:
            raise ConfigError(f"task {self.name}: few-shot prompts need fewshot_split in its definition")
        local = source if self.spec.hf_dataset is None or source.endswith((".jsonl", ".parquet")) else None
        return [self._example(r, i, local or source) for i, r in enumerate(self._records(source, local))]

    def _example(self, record: dict, index: int, where) -> Example:
        s, where = self.spec, f"{where or self.spec.hf_dataset} example {index}"
        if s.data_files and s.context == "{{context}}":  # a file task: the fields themselves
            for key in ("context", "choices", "gold"):
                if key not in record:
                    raise ConfigError(f"task {self.name}: {where}: missing field {key!r}")
        context = _render(s.context, record, "context", self.name)
        if s.formulation == "fg":  # the reference answer is the one "choice"
            return Example(context, [str(_render(s.answer, record, "answer", self.name)).strip()],
                           0, record)
        context = s.clean(context)
        choices = [s.clean(c) for c in _as_list(_render(s.choices, record, "choices", self.name),
                                                self.name)]
        raw_gold = _render(s.gold, record, "gold", self.name)
        if isinstance(raw_gold, bool):  # int(True) is 1: a flag is not a choice index
            raise ConfigError(f"task {self.name}: {where}: gold {raw_gold!r} is not an index")
        try:
            gold = int(raw_gold)
        except (TypeError, ValueError):
            raise ConfigError(f"task {self.name}: {where}: gold {raw_gold!r} is not an index") from None
        if not 0 <= gold < len(choices):
            raise ConfigError(f"task {self.name}: {where}: gold {gold} is out of range for "
                              f"{len(choices)} choices")
        return Example(context, choices, gold, record)


def file_task(path: Path) -> Task:
    """A JSONL / Parquet file of ``{"context", "choices", "gold"}`` items, scored as cloze with
    each choice appended to the context exactly as written."""
    spec = TaskSpec(name=path.stem, data_files=str(path.resolve()), target_delimiter="",
                    source=str(path))
    return Task(spec, path.parent)


def task_names() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def load_task(name_or_path: str) -> Task:
    """A task file (.jsonl / .parquet), a task YAML path, or the name of a built-in definition."""
    path = Path(name_or_path)
    if path.suffix in (".jsonl", ".parquet"):
        if not path.is_file():
            raise ConfigError(f"task file {path}: no such file")
        return file_task(path)
    if path.suffix not in (".yaml", ".yml"):
        from megasmol.eval.embedded import EMBEDDED, embedded_task

        if name_or_path in EMBEDDED:
            return embedded_task(name_or_path)
        path = TASK_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown task {name_or_path!r}; built in: "
                              f"{', '.join(task_names() + sorted(EMBEDDED))}, or a .jsonl/.yaml path")
    try:
        spec = from_dict(TaskSpec, load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return Task(spec, path.parent, path)


def sample(examples: list, limit: Optional[int], seed: int) -> list:
    """A fixed, seeded subset of ``limit`` examples (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]
