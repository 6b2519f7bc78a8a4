"""Document readers for JSONL, plain text and Parquet, with honest accounting of bad input.

Every record that cannot become a document is counted under a named reason instead of being
dropped silently; the tokenizer reports those counts in its summary and stats JSON.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megasmol.config.typed import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".txt.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES
# A directory scan skips plain .json: beside datasets those are manifests and stats, not records.
SCANNED = tuple(s for s in SUPPORTED if s not in (".json", ".json.gz"))


@dataclass
class ReadIssues:
    """Counts of records that did not become documents (or were repaired), by reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)


def _kind(path: Path) -> str:
    name = path.name.lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("text", TEXT_SUFFIXES),
                           ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    raise ConfigError(f"input {path}: unsupported file type (expected one of {', '.join(SUPPORTED)})")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, directories (searched recursively) or globs, sorted and unique."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SCANNED))
        elif any(ch in pattern for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        elif path.is_file():
            found = [path]
        else:
            raise ConfigError(f"input {pattern}: no such file or directory")
        if not found:
            raise ConfigError(f"input {pattern}: matches no supported file ({', '.join(SUPPORTED)})")
        files.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    for path in unique:
        _kind(path)
    return unique


def decode_text(raw: bytes, where: str, issues: ReadIssues) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Keep the document (most of it is usually fine) but say how many needed repair.
        issues.add("invalid_utf8_replaced", where)
        return raw.decode("utf-8", errors="replace")


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl(path: Path, text_key: str, issues: ReadIssues) -> Iterator[str]:
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            line = decode_text(raw, where, issues)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                issues.add("malformed_json", where)
                continue
            if not isinstance(record, dict) or text_key not in record:
                issues.add("missing_text_key", where)
                continue
            text = record[text_key]
            if not isinstance(text, str):
                issues.add("text_not_a_string", where)
                continue
            if not text.strip():
                issues.add("empty_text", where)
                continue
            yield text


def _read_text(path: Path, issues: ReadIssues) -> Iterator[str]:
    with open_binary(path) as handle:
        text = decode_text(handle.read(), str(path), issues)
    if not text.strip():
        issues.add("empty_text", str(path))
        return
    yield text


def _read_parquet(path: Path, text_key: str, issues: ReadIssues) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_key not in parquet.schema_arrow.names:
        raise ConfigError(f"input {path}: no column {text_key!r} "
                          f"(columns: {', '.join(parquet.schema_arrow.names)}); use --text-key")
    row = 0
    for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None or (isinstance(text, str) and not text.strip()):
                issues.add("empty_text", f"{path}:row {row}")
                continue
            if isinstance(text, bytes):
                text = decode_text(text, f"{path}:row {row}", issues)
            yield text


def read_documents(path: Path, text_key: str, issues: ReadIssues) -> Iterator[str]:
    """Yield the documents of one file; unreadable files raise ``ConfigError`` naming the file."""
    kind = _kind(path)
    try:
        if kind == "jsonl":
            yield from _read_jsonl(path, text_key, issues)
        elif kind == "text":
            yield from _read_text(path, issues)
        else:
            yield from _read_parquet(path, text_key, issues)
    except (OSError, EOFError) as exc:
        raise ConfigError(f"input {path}: cannot read ({exc})") from exc
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        if type(exc).__module__.startswith("pyarrow"):
            raise ConfigError(f"input {path}: not a readable Parquet file ({exc})") from exc
        raise
