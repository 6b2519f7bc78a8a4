"""``data-audit``: what a run's plan will draw from each dataset, and what is wrong with it.

For each stage and dataset: tokens available, tokens the plan draws, and the epochs that
implies (also summed over stages, since a dataset shared by stages is read again). Errors stop
training before it starts: missing files, a ``.bin`` whose size differs from its index, token
ids beyond the model's vocabulary (the whole dataset is scanned once; the verdict is cached by
file size and modification time), an EOS id the model does not use for document boundaries.
Warnings: weights that do not sum to 1 and datasets repeated more than ``data.max_epochs``
times (the playbook: more than 3% math in stage 1 would have meant more than 5 epochs of it).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megasmol.data.recipe import DataRecipe, StagePlan, batch_schedule
from megasmol.data.tokenize import missing_parts, read_stats
from megasmol.model.run_spec import run_model_spec
from megasmol.utils.table import format_table

SCAN_CHUNK = 1 << 26  # tokens per numpy pass of the full-dataset id scan


@dataclass
class DatasetRow:
    stage: str
    name: str
    prefix: str
    weight: float
    documents: int = 0
    tokens_available: int = 0
    tokens_drawn: int = 0
    epochs: float = 0.0
    epochs_all_stages: float = 0.0


@dataclass
class AuditReport:
    rows: list[DatasetRow] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stage_lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self, errors: bool = True) -> str:
        """The stages, the table, the warnings, the errors (unless ``errors=False``: training
        raises them as its one error line) and the verdict."""
        out = list(self.stage_lines)
        if self.rows:
            header = ("stage", "dataset", "weight", "available", "drawn", "epochs", "all stages")
            table = [header] + [
                (r.stage, r.name, f"{r.weight:.4f}", _human(r.tokens_available), _human(r.tokens_drawn),
                 f"{r.epochs:.2f}", f"{r.epochs_all_stages:.2f}") for r in self.rows]
            out.append(format_table(table))
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"error: {e}" for e in self.errors] if errors else []
        out.append("audit: " + ("OK" if self.ok else f"{len(self.errors)} error(s)")
                   + (f", {len(self.warnings)} warning(s)" if self.warnings else ""))
        return "\n".join(out)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _scan_id_range(prefix: Path, dtype) -> tuple[int, int]:
    """The smallest and largest token id in the whole ``.bin`` (chunked, so memory stays flat);
    a signed dtype can hold negative ids, which no vocabulary has."""
    data = np.memmap(str(prefix) + ".bin", dtype=dtype, mode="r")
    smallest, largest = 0, 0
    for start in range(0, data.size, SCAN_CHUNK):
        chunk = data[start:start + SCAN_CHUNK]
        largest = max(largest, int(chunk.max(initial=0)))
        smallest = min(smallest, int(chunk.min(initial=0)))
    return smallest, largest


class ScanCache:
    """Verdicts of the full id scan, keyed by each file's path, inode, size, modification time
    and status-change time, so a dataset is read once and again only when it changes (a stats
    JSON is never trusted for it). The ctime moves on every write and cannot be set back, so an
    in-place rewrite that restores the mtime is still seen; a copy or rename gets a new inode."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.entries: dict = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                self.entries = {}  # rebuilt below

    @staticmethod
    def _fingerprint(prefix: str) -> list:
        out = []
        for suffix in (".bin", ".idx"):
            st = os.stat(prefix + suffix)
            out += [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        return out

    def id_range(self, prefix: str, dtype) -> tuple[int, int]:
        key = str(Path(prefix).resolve())
        fingerprint = self._fingerprint(prefix)
        entry = self.entries.get(key)
        if entry is not None and entry.get("fingerprint") == fingerprint and "min_token_id" in entry:
            return int(entry["min_token_id"]), int(entry["max_token_id"])
        smallest, largest = _scan_id_range(Path(prefix), dtype)
        self.entries[key] = {"fingerprint": fingerprint, "min_token_id": smallest, "max_token_id": largest}
        if self.path is not None:
            from megasmol.utils.fs import atomic_write_text

            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True))
        return smallest, largest


def _bin_size_error(prefix: str, indexed) -> Optional[str]:
    """The ``.bin`` must be exactly as long as its ``.idx`` says (a truncated copy is not)."""
    index = indexed.index
    itemsize = np.dtype(index.dtype).itemsize
    if len(index.sequence_lengths):
        expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize
    else:
        expected = 0
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        return (f"{prefix}.bin has {actual:,} bytes but {prefix}.idx describes {expected:,} "
                f"({'truncated' if actual < expected else 'longer than its index'}: copy it again "
                "or run prepare-data again)")
    return None


def _check_prompts(report: AuditReport, row: DatasetRow, prefix: str, vocab_size: int,
                   eos_id: int) -> None:
    """A prompt set's prompts fit the model: ids inside its vocabulary, and no EOS, which would
    end the document a completion is packed in before the completion starts."""
    from megasmol.data.prompts.store import read_prompts

    prompts = read_prompts(prefix)
    row.documents = len(prompts)
    for index, record in enumerate(prompts):
        if record.prompt_ids and max(record.prompt_ids) >= vocab_size:
            report.errors.append(f"{prefix}: prompt {index} ({record.where}) has token id "
                                 f"{max(record.prompt_ids)}, outside the model's vocabulary of {vocab_size}")
            return
        if eos_id in record.prompt_ids:
            report.errors.append(f"{prefix}: prompt {index} ({record.where}) contains the model's EOS "
                                 f"(id {eos_id}), which ends a packed document; prepare the prompts "
                                 "with a template or tokenizer whose EOS differs from the end of a turn")
            return


def audit_plan(recipe: DataRecipe, plans: list[StagePlan], *, vocab_size: int, eos_id: int,
               root: Optional[str] = None, max_epochs: float = 4.0,
               validation_fraction: float = 0.0, scan_cache: Optional[Path] = None) -> AuditReport:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megasmol.data.prompts.store import is_prompt_set

    report = AuditReport()
    drawn_total: dict[str, int] = defaultdict(int)
    available: dict[str, int] = {}
    scans = ScanCache(scan_cache)
    absent: dict[str, tuple[list[str], list[str]]] = {}  # prefix -> (missing parts, stages)
    for plan in plans:
        stage = plan.stage
        report.stage_lines.append(
            f"stage {stage.name}: steps {plan.first_step:,}-{plan.last_step:,} ({plan.steps:,} steps x "
            f"{plan.global_batch_size} x {plan.seq_length} = {_human(plan.tokens)} tokens)")
        total_weight = stage.weight_sum
        if abs(total_weight - 1.0) > 1e-3:
            report.warnings.append(f"stage {stage.name}: weights sum to {total_weight:.5f}, not 1; "
                                   "they are normalized")
        for entry in stage.datasets:
            try:
                prefix = recipe.dataset_prefix(entry, root)
            except ValueError as exc:
                report.errors.append(str(exc))
                continue
            key = str(prefix)
            row = DatasetRow(stage.name, entry.label, key, entry.weight / total_weight)
            row.tokens_drawn = int(round(plan.tokens * row.weight))
            report.rows.append(row)
            if is_prompt_set(key):  # RL prompts: no tokens drawn, each prompt checked once
                _check_prompts(report, row, key, vocab_size, eos_id)
                continue
            missing = missing_parts(key)
            if missing:
                absent.setdefault(key, (missing, []))[1].append(stage.name)
                continue
            if key not in available:
                try:
                    indexed = IndexedDataset(key, mmap=True)
                except Exception as exc:  # a truncated or foreign .idx
                    report.errors.append(f"{key}.idx: unreadable indexed dataset ({exc})")
                    continue
                size_error = _bin_size_error(key, indexed)
                if size_error:
                    report.errors.append(size_error)
                    continue
                available[key] = int(np.asarray(indexed.sequence_lengths, dtype=np.int64).sum())
                row.documents = len(indexed.document_indices) - 1
                _check_tokens(report, key, indexed, vocab_size, eos_id, scans)
            row.tokens_available = int(available[key] * (1.0 - validation_fraction))
            drawn_total[key] += row.tokens_drawn
            row.epochs = row.tokens_drawn / max(row.tokens_available, 1)
    if absent:
        report.errors.insert(0, missing_data_error(absent))
    for row in report.rows:
        if row.prefix in available:
            row.epochs_all_stages = drawn_total[row.prefix] / max(row.tokens_available, 1)
    repeated = {}
    for row in report.rows:
        if row.epochs_all_stages > max_epochs:
            repeated[row.prefix] = row
    for row in repeated.values():
        report.warnings.append(f"{row.name}: drawn {row.epochs_all_stages:.1f} times over the run "
                               f"(data.max_epochs={max_epochs:g}); add data or lower its weight")
    return report


def missing_data_error(absent: dict[str, tuple[list[str], list[str]]]) -> str:
    """One error for every dataset the plan names that is not there: each file once (by folder),
    the stages that read it, and the command that makes it."""
    from megasmol.utils.fs import shown

    prefixes = [Path(p) for p in absent]
    folders = {p.parent for p in prefixes}
    if len(prefixes) > 1 and len(folders) == 1:
        files = f"missing in {shown(prefixes[0].parent)}: " + ", ".join(
            p.name + "/".join(absent[str(p)][0]) for p in prefixes)
    else:
        files = "missing " + ", ".join(shown(p) + "/".join(absent[str(p)][0]) for p in prefixes)
    stages = list(dict.fromkeys(stage for _, users in absent.values() for stage in users))
    return f"{files} (stage{'s' if len(stages) > 1 else ''} {', '.join(stages)}); {_how_to_make(prefixes)}"


def _how_to_make(prefixes: list[Path]) -> str:
    """The command that writes ``prefixes``, where megasmol knows it (the demo corpus), else
    where the guide says how."""
    from megasmol.data.demo_corpus import DOMAINS, DemoCorpus

    corpora = {p.parent.parent for p in prefixes}
    if len(corpora) == 1:
        corpus = DemoCorpus(next(iter(corpora)))
        if all(p in {corpus.prefix(d) for d in DOMAINS} for p in prefixes):
            from megasmol.utils.fs import shown

            return (f"the demo corpus makes them: `megasmol demo-corpus --out {shown(corpus.root)} "
                    "--tokenize`")
    return ("make each with `megasmol prepare-data --input FILES --out PREFIX` (text; prepare-chat "
            "for conversations, prepare-preferences for pairs: docs/data.md), or set data.root to "
            "the folder that holds them")


def _check_tokens(report: AuditReport, key: str, indexed, vocab_size: int, eos_id: int,
                  scans: ScanCache) -> None:
    stats = read_stats(key)
    if stats is not None and stats.get("eos_id") not in (None, eos_id):
        report.errors.append(f"{key}: documents end with token {stats['eos_id']} but the model's "
                             f"eos_token_id is {eos_id}; document masking would not see the "
                             "boundaries (tokenizer mismatch?)")
    min_id, max_id = scans.id_range(key, indexed.index.dtype)
    if min_id < 0:
        report.errors.append(f"{key}: token id {min_id} (in {key}.bin) is negative: the file was not "
                             "written by a tokenizer (wrong dtype, or corrupt)")
    if max_id >= vocab_size:
        report.errors.append(f"{key}: token id {max_id} (in {key}.bin) is outside the model's "
                             f"vocabulary of {vocab_size}")


def audit_run(config, spec=None) -> AuditReport:
    """Audit a ``RunConfig``: its recipe, its plan, and its model's vocabulary."""
    from megasmol.data.recipe import load_recipe, plan_stages

    spec = spec or run_model_spec(config)
    recipe = load_recipe(config.recipe_reference())
    plans = plan_stages(recipe, config.training.train_steps, batch_schedule(config.training),
                        config.data.seq_length)
    return audit_plan(recipe, plans, vocab_size=spec.vocab_size, eos_id=spec.eos_token_id,
                      root=config.data.root and str(config.path(config.data.root)),
                      max_epochs=config.data.max_epochs,
                      validation_fraction=config.data.validation_fraction,
                      scan_cache=config.cache_dir / "token_scan.json")
