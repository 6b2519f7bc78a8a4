"""Records holding message lists: read them (JSONL, Parquet, a ``datasets`` dataset) and check
the shape of a message list and of the template extras.

A message list is ``[{"role": ..., "content": ...}, ...]``; a record may add ``tools`` (a list given
to the template) and ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``), the layout of
the SmolTalk / TRL conversational and preference datasets. What a record must hold beyond that is
the reader's: conversations (:mod:`megasmol.data.chat.records`) or preference pairs
(:mod:`megasmol.data.preference.records`). Whatever cannot be used is counted under a named
reason with its first location (``ReadIssues``), never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError
from megasmol.data.readers import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    ReadIssues,
    decode_text,
    expand_inputs,
    open_binary,
)

ROLES = ("system", "user", "assistant", "tool")


Messages = list[dict]


def check_messages(value) -> tuple[Optional[Messages], Optional[str]]:
    """(clean messages, None) for a list of ``{"role", "content"}`` dicts with known roles and
    string contents (None reads as ""), else (None, reason): ``malformed_messages`` or
    ``unknown_role``. An empty list is clean; what a caller needs beyond the shape is its own."""
    if not isinstance(value, list):
        return None, "malformed_messages"
    clean = []
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return None, "malformed_messages"
        if message["role"] not in ROLES:
            return None, "unknown_role"
        content = "" if message["content"] is None else message["content"]
        if not isinstance(content, str):
            return None, "malformed_messages"
        clean.append({"role": message["role"], "content": content})
    return clean, None


def template_extras(record: dict) -> tuple[Optional[list], dict, Optional[str]]:
    """A record's ``tools`` and ``chat_template_kwargs`` for the template, or the reason they are
    unusable."""
    tools = record.get("tools")
    if isinstance(tools, str):  # Parquet / datasets often store tools as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            return None, {}, "malformed_tools"
    if tools is not None and not isinstance(tools, list):
        return None, {}, "malformed_tools"
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        return None, {}, "malformed_chat_template_kwargs"
    return tools or None, dict(kwargs), None


def _jsonl_records(path: Path, issues: ReadIssues) -> Iterator[tuple[object, str]]:
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield json.loads(decode_text(raw, where, issues)), where
            except json.JSONDecodeError:
                issues.add("malformed_json", where)


def _parquet_records(path: Path) -> Iterator[tuple[object, str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches(batch_size=512):
            for record in batch.to_pylist():
                row += 1
                yield record, f"{path}:row {row}"
    except Exception as exc:
        if type(exc).__module__.startswith("pyarrow"):
            raise ConfigError(f"input {path}: not a readable Parquet file ({exc})") from exc
        raise


def _datasets_records(source: str, split: str) -> Iterator[tuple[object, str]]:
    """A ``save_to_disk`` directory or, where a hub is reachable, a hub dataset id."""
    import datasets

    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ConfigError(f"input {source}: no split {split!r} (has {', '.join(loaded)})")
                loaded = loaded[split]
        else:
            from megasmol.utils.hub import require_hub

            require_hub(f"input {source} (not a local file or directory)",
                        "give a JSONL or Parquet file, or a datasets save_to_disk directory")
            loaded = datasets.load_dataset(source, split=split)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"input {source}: cannot load it with the datasets library ({exc})") from exc
    for row, record in enumerate(loaded, start=1):
        yield record, f"{source}[{split}]:row {row}"


def is_saved_dataset(path: Path) -> bool:
    markers = ("dataset_info.json", "dataset_dict.json")
    return path.is_dir() and any((path / name).is_file() for name in markers)


def read_records(inputs: list[str], issues: ReadIssues, split: str = "train") -> Iterator[tuple[object, str]]:
    """(record, location) of ``inputs``: JSONL / Parquet files, directories or globs; ``datasets``
    directories (``save_to_disk``); ``hf:ID`` for a hub dataset."""
    for source in inputs:
        if source.startswith("hf:"):
            yield from _datasets_records(source[3:], split)
        elif is_saved_dataset(Path(source)):
            yield from _datasets_records(source, split)
        else:
            yield from _file_records(expand_inputs([source]), issues)


def _file_records(files: list[Path], issues: ReadIssues) -> Iterator[tuple[object, str]]:
    for path in files:
        name = path.name.lower()
        if name.endswith(PARQUET_SUFFIXES):
            yield from _parquet_records(path)
        elif name.endswith(JSONL_SUFFIXES):
            try:
                yield from _jsonl_records(path, issues)
            except (OSError, EOFError) as exc:
                raise ConfigError(f"input {path}: cannot read ({exc})") from exc
        else:
            raise ConfigError(f"input {path}: conversations are read from JSONL or Parquet files")
