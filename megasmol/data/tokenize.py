"""``prepare-data``: tokenize documents into a Megatron-Core indexed dataset (.bin/.idx).

Readers run in the main process and hand batches of documents to tokenizer worker processes
(a bounded number in flight, so memory stays flat on inputs of any size); results come back in
order and are written with Megatron-Core's own ``IndexedDatasetBuilder``, so the output is the
format Megatron-LM reads and writes. EOS is appended to every document. Files are written under
``.partial`` names and renamed when complete; the ``.idx`` is renamed last, so a prefix with an
``.idx`` is always whole.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.readers import ReadIssues, expand_inputs, read_documents
from megasmol.errors import OutputExists
from megasmol.utils.fs import shown
from megasmol.utils.prefetch import prefetched
from megasmol.utils.progress import progress_bar

DTYPES = {"uint16": np.uint16, "int32": np.int32}
BATCH_CHARS = 1 << 20  # documents are grouped into ~1 MB batches for the workers


@dataclass
class TokenizeSummary:
    """What ``prepare-data`` wrote, and what it could not use and why."""

    output_prefix: str
    tokenizer: str
    vocab_size: int
    eos_id: int
    dtype: str
    files: int
    documents: int
    tokens: int
    max_token_id: int
    seconds: float
    tokens_per_second: float
    workers: int
    skipped: dict = field(default_factory=dict)
    skipped_examples: dict = field(default_factory=dict)
    bad_files: list = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"wrote {shown(self.output_prefix)}.bin/.idx ({self.dtype})",
            f"  files      {self.files:,}",
            f"  documents  {self.documents:,}",
            f"  tokens     {self.tokens:,} (EOS included, max id {self.max_token_id})",
            f"  time       {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s "
            f"with {self.workers} worker(s)",
        ]
        for reason, count in sorted(self.skipped.items()):
            out.append(f"  {reason}: {count:,} (first at {self.skipped_examples[reason]})")
        for bad in self.bad_files:
            out.append(f"  skipped file: {bad}")
        return out


# ---- worker side -------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _load_backend(tokenizer_source: str):
    from megasmol.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    return tokenizer, getattr(tokenizer, "backend_tokenizer", None)


def _worker_init(tokenizer_source: str) -> None:
    global _WORKER_TOKENIZER
    # Each worker is one of N processes: Rust-side threading would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = _load_backend(tokenizer_source)


def encode_batch(texts: list[str], eos_id: int, tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` with EOS appended to each: (flat int64 ids, per-document lengths)."""
    hf_tokenizer, backend = tokenizer or _WORKER_TOKENIZER
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    else:  # slow (pure Python) tokenizers
        ids = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    flat[ends - 1] = eos_id
    start = 0
    for doc, end in zip(ids, ends):
        flat[start:end - 1] = doc
        start = end
    return flat, lengths


# ---- main side ---------------------------------------------------------------------------


def choose_dtype(requested: str, vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and page cache), else int32; check a forced one."""
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)
    if requested not in DTYPES:
        raise ConfigError(f"--dtype must be auto, uint16 or int32, not {requested!r}")
    dtype = np.dtype(DTYPES[requested])
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ConfigError(f"--dtype {requested}: the tokenizer has {vocab_size} ids and the "
                          f"largest ({vocab_size - 1}) does not fit {requested}; use int32 or auto")
    return dtype


def _batches(files: list[Path], text_key: str, issues: ReadIssues, skip_bad_files: bool,
             bad_files: list, bar) -> Iterator[list[str]]:
    batch, size = [], 0
    for path in files:
        before = sum(issues.counts.values())
        documents, failed, shown = 0, False, 0
        file_bytes = path.stat().st_size
        try:
            for text in read_documents(path, text_key, issues):
                documents += 1
                batch.append(text)
                size += len(text)
                if size >= BATCH_CHARS:
                    step = min(size, file_bytes - shown)  # characters approximate bytes
                    bar.update(step)
                    shown += step
                    yield batch
                    batch, size = [], 0
        except ConfigError as exc:
            if not skip_bad_files:
                raise
            bad_files.append(str(exc))
            failed = True
        if documents == 0 and not failed and sum(issues.counts.values()) == before:
            issues.add("empty_file", str(path))
        bar.update(file_bytes - shown)
    if batch:
        yield batch


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def prepare_data(inputs: list[str], out_prefix: str, tokenizer: Optional[str] = None,
                 text_key: str = "text", workers: Optional[int] = None, dtype: str = "auto",
                 overwrite: bool = False, skip_bad_files: bool = False,
                 show_progress: bool = True) -> TokenizeSummary:
    """Tokenize ``inputs`` (files, directories or globs) into ``out_prefix``.bin/.idx."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    from megasmol.tokenizer import default_tokenizer_dir

    files = expand_inputs(inputs)
    prefix = Path(out_prefix)
    bin_path, idx_path = Path(get_bin_path(str(prefix))), Path(get_idx_path(str(prefix)))
    stats_path = prefix.with_name(prefix.name + ".stats.json")
    if (bin_path.exists() or idx_path.exists()) and not overwrite:
        raise OutputExists(f"{idx_path} already exists (use --overwrite to replace it)")
    if not prefix.parent.is_dir():
        raise ConfigError(f"--out {out_prefix}: directory {prefix.parent} does not exist")

    tokenizer_source = str(tokenizer or default_tokenizer_dir())
    hf_tokenizer, backend = _load_backend(tokenizer_source)
    vocab_size = len(hf_tokenizer)
    eos_id = hf_tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError(f"tokenizer {tokenizer_source}: has no EOS token to end documents with")
    token_dtype = choose_dtype(dtype, vocab_size)
    workers = workers or 1

    partial_bin = bin_path.with_name(bin_path.name + ".partial")
    partial_idx = idx_path.with_name(idx_path.name + ".partial")
    builder = IndexedDatasetBuilder(str(partial_bin), dtype=token_dtype.type)
    issues, bad_files = ReadIssues(), []
    documents = tokens = 0
    max_id = -1
    dtype_max = np.iinfo(token_dtype).max
    start = time.perf_counter()
    pool = None
    try:
        total_bytes = sum(p.stat().st_size for p in files)
        with progress_bar(total_bytes, "tokenize", enabled=show_progress, unit="B") as bar:
            bar.unit_scale = True
            batches = _batches(files, text_key, issues, skip_bad_files, bad_files, bar)
            if workers == 1:
                # One process: the tokenizers library spreads each batch over all cores (it
                # releases the GIL), while a reader thread parses the next batch meanwhile.
                results = (encode_batch(b, eos_id, (hf_tokenizer, backend))
                           for b in prefetched(batches, depth=4))
            else:
                pool = multiprocessing.get_context("spawn").Pool(
                    workers, initializer=_worker_init, initargs=(tokenizer_source,))
                results = _ordered(pool, batches, eos_id, in_flight=2 * workers)
            for flat, lengths in results:
                if flat.size:
                    batch_max = int(flat.max())
                    if batch_max > dtype_max:
                        raise ConfigError(f"token id {batch_max} does not fit {token_dtype.name}; "
                                          "nothing was written (use --dtype int32)")
                    max_id = max(max_id, batch_max)
                offsets = np.concatenate(([0], np.cumsum(lengths)))
                for i in range(len(lengths)):
                    builder.add_document(flat[offsets[i]:offsets[i + 1]], [int(lengths[i])])
                documents += len(lengths)
                tokens += int(flat.size)
        if documents == 0:
            raise ConfigError("no documents found in the inputs: "
                              + (", ".join(f"{k}={v}" for k, v in issues.counts.items()) or "all empty"))
        builder.finalize(str(partial_idx))
    except BaseException:
        builder.data_file.close()
        _remove_quietly(partial_bin, partial_idx)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    seconds = time.perf_counter() - start
    summary = TokenizeSummary(
        output_prefix=str(prefix), tokenizer=tokenizer_source, vocab_size=vocab_size, eos_id=eos_id,
        dtype=token_dtype.name, files=len(files), documents=documents, tokens=tokens,
        max_token_id=max_id, seconds=round(seconds, 3),
        tokens_per_second=round(tokens / max(seconds, 1e-9), 1), workers=workers,
        skipped=dict(issues.counts), skipped_examples=dict(issues.examples), bad_files=bad_files)
    _remove_quietly(idx_path)  # an old .idx must never pair with the new .bin
    os.replace(partial_bin, bin_path)
    os.replace(partial_idx, idx_path)
    partial_stats = stats_path.with_name(stats_path.name + ".partial")
    partial_stats.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    os.replace(partial_stats, stats_path)
    return summary


def _ordered(pool, batches, eos_id: int, in_flight: int):
    """``pool.imap`` with a bound on queued batches (imap would read the whole input ahead)."""
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(encode_batch, (batch, eos_id)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def missing_parts(prefix: str | Path) -> list[str]:
    """Which of ``.bin`` / ``.idx`` an indexed dataset prefix lacks (empty when whole)."""
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    return [suffix for suffix, path in ((".bin", get_bin_path(str(prefix))),
                                        (".idx", get_idx_path(str(prefix))))
            if not Path(path).is_file()]


def read_stats(prefix: str | Path) -> Optional[dict]:
    """The stats JSON ``prepare-data`` wrote beside a dataset, or None for foreign datasets."""
    path = Path(str(prefix) + ".stats.json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
