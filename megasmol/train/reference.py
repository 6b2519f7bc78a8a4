"""Reference log-probabilities for preference training, computed once and stored beside the data.

DPO and APO compare the policy's log-probability of each completion with a frozen reference
model's. Instead of holding a second model and running its forward pass every step (TRL's
default), the reference checkpoint's log-probs of every pair are computed by one forward-only
pass over the dataset, in the run's own parallel layout, and written to
``PREFIX.ref-<key>.npy`` ([pairs, 2] float64: chosen, rejected). The key hashes the reference
checkpoint's contents (every byte of its weights, its spec and DCP index: see
:func:`weights_digest`), the data (indices, masks, description) and the precision, so a rerun or
a resumed run reuses the file, and a different reference, one whose shards were replaced in
place, or changed data gets a new one. Written on rank 0 under a temporary name and renamed,
then ``PREFIX.ref-<key>.json`` records the file's sha256: a file whose bytes no longer match it
(edited, cut short, copied badly) is refused with one line rather than trained against, since
only something outside megasmol changes it and recomputing would hide that; deleting it
recomputes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from megasmol.ckpt.checkpoint import CheckpointError
from megasmol.config.typed import ConfigError
from megasmol.errors import UserError
from megasmol.utils.fs import atomic_write_bytes, atomic_write_text, shown

if TYPE_CHECKING:
    from megasmol.train.setup import TrainingSetup

log = logging.getLogger(__name__)


_NOT_WEIGHTS = ("optimizer.", "rng_state")
"""Stored items no forward pass reads: a training checkpoint's optimizer state (Adam's moments and
fp32 master weights, several times the size of the weights) and RNG streams."""
_BLOCK = 1 << 24


def _hash_file(digest, path: Path, limit: int = 1 << 20) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(limit))
        if size > 2 * limit:
            handle.seek(size - limit)
            digest.update(handle.read(limit))


def _hash_range(digest, handle, path: Path, offset: int, length: int) -> None:
    handle.seek(offset)
    while length > 0:
        block = handle.read(min(length, _BLOCK))
        if not block:
            raise CheckpointError(f"{path} ends early (truncated?): copy the reference checkpoint "
                                  "again from a complete one")
        digest.update(block)
        length -= len(block)


def weights_digest(reference: Path) -> str:
    """sha256 over every byte a forward pass of checkpoint ``reference`` depends on: its spec and
    precision (from ``megasmol.json``, whose run settings and paths do not count, so a copied
    run keeps its key), DCP's index (``.metadata``), ``common.pt`` and each stored item but
    optimizer state and RNG streams, so shards replaced in place (same names, same sizes) change
    it. Reads the weights once (sha256, about 1.5 GB/s on one core), on rank 0 at each training
    start: 0.1 s for the tests' tiny model (33 MB), some 4 s for a 3B model in bf16 (6 GB);
    a training checkpoint's optimizer state, several times larger, is not read."""
    from itertools import groupby

    from megasmol.ckpt.checkpoint import META_FILE, read_metadata, resolve
    from megasmol.ckpt.storage import stored_items

    read_metadata(reference)  # names a missing .metadata or common.pt
    iteration = resolve(reference)
    digest = hashlib.sha256()
    meta = json.loads((iteration / META_FILE).read_text())  # the spec, not where the run was
    digest.update(json.dumps([meta.get("model_spec"), meta.get("params_dtype")], sort_keys=True).encode())
    for name in (".metadata", "common.pt"):
        digest.update(name.encode())
        with open(iteration / name, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    weights = [item for item in stored_items(iteration) if not item.fqn.startswith(_NOT_WEIGHTS)]
    for name, items in groupby(weights, key=lambda item: item.file):
        if not (iteration / name).is_file():
            raise CheckpointError(f"{iteration / name} is missing (.metadata lists it): copy the "
                                  "reference checkpoint again from a complete one")
        with open(iteration / name, "rb") as handle:
            for item in items:
                digest.update(f"{item.fqn}@{name}:{item.offset}+{item.length}".encode())
                _hash_range(digest, handle, iteration / name, item.offset, item.length)
    return digest.hexdigest()


def reference_key(prefix: str, reference: Path, params_dtype: torch.dtype,
                  weights: Optional[str] = None) -> str:
    """A short hash of the reference checkpoint's contents (``weights``: its
    :func:`weights_digest`, computed when not given), the preference data and the precision."""
    from megasmol.data.masked.layout import mask_prefix
    from megasmol.data.preference.prepare import description_path

    digest = hashlib.sha256(str(params_dtype).encode())
    digest.update((weights or weights_digest(reference)).encode())
    for path in (Path(f"{prefix}.idx"), Path(f"{prefix}.bin"), Path(f"{mask_prefix(prefix)}.idx"),
                 Path(f"{mask_prefix(prefix)}.bin"), description_path(prefix)):
        _hash_file(digest, path)
    return digest.hexdigest()[:16]


def reference_path(prefix: str, key: str) -> Path:
    return Path(f"{prefix}.ref-{key}.npy")


def record_path(path: Path) -> Path:
    """``PREFIX.ref-<key>.json``: the sha256 and size of the ``.npy`` as it was written."""
    return path.with_suffix(".json")


def save_reference_logps(path: Path, values: np.ndarray, reference: Path) -> None:
    """The file, then its record (each written under a temporary name and renamed): a file
    without its record is one whose writing was cut off, computed again."""
    buffer = io.BytesIO()
    np.save(buffer, values)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "pairs": len(values),
              "reference": str(reference)}
    atomic_write_text(record_path(path), json.dumps(record, indent=2) + "\n")


def is_saved(path: Path) -> bool:
    return path.is_file() and record_path(path).is_file()


def check_saved(path: Path) -> None:
    """One error line when ``path`` no longer holds the bytes its record says were written."""
    record_file = record_path(path)
    try:
        record = json.loads(record_file.read_text())
        expected, size = record["sha256"], int(record["bytes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{record_file}: unreadable record of {path.name} ({exc}); delete both to "
                          "recompute the reference log-probs") from None
    actual = path.stat().st_size
    if actual < size:
        raise ConfigError(f"{path} ends early ({actual:,} of {size:,} bytes; truncated?): delete it to "
                          "recompute the reference log-probs")
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if actual != size or digest != expected:
        raise ConfigError(f"{path}: not the reference log-probs megasmol computed (its sha256 differs "
                          f"from the one {record_file.name} recorded: edited or damaged); delete it "
                          "to recompute them")


def pair_datasets(stages) -> dict[str, list]:
    """{prefix: its PairTokens objects} over every split of every stage."""
    from megasmol.data.masked.units import PairTokens

    found: dict[str, list] = {}
    for stage in stages:
        for split in (stage.train, stage.valid):
            for part in getattr(split, "datasets", [split]) if split is not None else []:
                low = getattr(part, "dataset", None)
                if isinstance(low, PairTokens):
                    found.setdefault(low.prefix, []).append(low)
    return found


def compute_reference_logps(model, prefix: str, seq_length: int, token_ids, *, packing: str,
                            cache_dir: Path, mask_format: str, show_progress: bool,
                            micro_batch_size: int = 1) -> np.ndarray:
    """[pairs, 2] summed completion log-probs of ``model`` (collective: every rank calls it).

    Packed sequences are spread over data-parallel ranks; each is scored forward-only through the
    pipeline schedule, its documents' log-probs summed over the context-parallel group, and the
    values (held by one rank per pipeline) summed over the world.
    """
    from megatron.core import parallel_state

    from megasmol.data.loader import _collate
    from megasmol.data.masked.dataset import open_chat_dataset
    from megasmol.data.masking import device_inputs
    from megasmol.runtime.distributed import current_device
    from megasmol.runtime.pipeline import forward_only_outputs
    from megasmol.train.objectives.segments import document_logps
    from megasmol.utils.progress import progress_bar

    data = open_chat_dataset(prefix, seq_length, token_ids, packing=packing, cache_dir=cache_dir)
    low, plan = data.dataset, data.plan
    assert plan is not None, "pairs are packed units: their dataset always has a packing plan"
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, plan.num_sequences, dp))
    values = np.zeros((low.num_pairs, 2), dtype=np.float64)
    holder = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_context_parallel_rank() == 0)
    rows = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    # A few micro-batches per pipeline schedule call, all of one size (a short last one alone).
    full = [g for g in rows if len(g) == micro_batch_size]
    calls = [full[i:i + 8] for i in range(0, len(full), 8)] + [[g] for g in rows if len(g) < micro_batch_size]
    model.eval()
    with torch.no_grad(), progress_bar(len(mine), "reference log-probs", enabled=show_progress,
                                       unit="seq") as bar:
        for chunk in calls:
            batches = [_collate([data.packed_sample(q) for q in group]) for group in chunk]
            micro = device_inputs(batches, token_ids.eod, True, mask_format)
            outputs = forward_only_outputs(model, micro, document_logps)
            if holder and outputs:
                for group, output in zip(chunk, outputs):
                    logps = output["logps"].to(torch.float64).cpu().numpy()
                    for row, sequence in enumerate(group):
                        members = plan.order[plan.bounds[sequence]:plan.bounds[sequence + 1]]
                        base = row * seq_length
                        for slot, member in enumerate(members):
                            pair = int(data.indices[member])
                            values[pair] = logps[base + 2 * slot], logps[base + 2 * slot + 1]
            bar.update(sum(len(group) for group in chunk))
    model.train()
    reduced = torch.from_numpy(values).to(current_device())
    torch.distributed.all_reduce(reduced)
    return reduced.cpu().numpy()


def load_reference_logps(path: Path, pairs: int) -> np.ndarray:
    """The [pairs, 2] values of ``path``, checked against the record written with them."""
    check_saved(path)
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable reference log-probs ({exc}); delete it to recompute") from None
    if values.shape != (pairs, 2) or not np.isfinite(values).all():
        raise ConfigError(f"{path}: reference log-probs of shape {values.shape} (or non-finite) for "
                          f"{pairs} pairs; delete it to recompute")
    return values


def _plan(found, reference: Path, params_dtype) -> tuple[dict, list, Optional[str]]:
    """Rank 0: each prefix's key, the prefixes whose log-probs are still to compute, or the one
    line every rank fails with (a damaged reference, a file that is not what was written)."""
    try:
        weights = weights_digest(reference)
        keys = {prefix: reference_key(prefix, reference, params_dtype, weights) for prefix in found}
        missing = []
        for prefix in found:
            path = reference_path(prefix, keys[prefix])
            if is_saved(path):
                check_saved(path)
            else:
                missing.append(prefix)
    except (UserError, OSError) as exc:  # OSError: a file unreadable as it is read (named in it)
        return {}, [], str(exc)
    return keys, missing, None


def attach_reference_logps(setup: TrainingSetup, reference: Path, *,
                           weights_after: Optional[Path] = None, show_progress: bool = True,
                           say: Callable[[str], None] = print) -> list[Path]:
    """Give every preference dataset of ``setup`` its reference log-probs, computing the missing
    ones with ``reference``'s weights loaded into the model (then ``weights_after``, when given,
    is loaded back). Collective. Returns the files used."""
    from megasmol.ckpt.checkpoint import load_model_weights
    from megasmol.data.loader import TokenIds

    config = setup.config
    found = pair_datasets(setup.batches.stages)
    plan: list = [_plan(found, reference, setup.params_dtype) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(plan, src=0)  # every rank decides as rank 0 saw it
    keys, missing, error = plan[0]
    if error:
        raise ConfigError(error)
    if missing:
        load_model_weights(setup.model, reference)
        seq = max(p.seq_length for p in setup.batches.plans)
        for prefix in missing:
            path = reference_path(prefix, keys[prefix])
            started = time.perf_counter()
            values = compute_reference_logps(
                setup.ddp_model, prefix, seq, TokenIds.from_spec(setup.spec), packing=config.data.packing,
                cache_dir=config.cache_dir / "reference", mask_format=setup.mask_format,
                micro_batch_size=config.training.micro_batch_size,
                show_progress=show_progress and setup.is_logging_rank and sys.stderr.isatty())
            if setup.is_logging_rank:
                save_reference_logps(path, values, reference)
                say(f"reference log-probs: {len(values):,} pairs of {Path(prefix).name} scored by "
                    f"{shown(reference)} in {time.perf_counter() - started:.1f}s -> {path.name}")
            torch.distributed.barrier()
        if weights_after is not None:
            load_model_weights(setup.model, weights_after)
    used = []
    for prefix, lows in found.items():
        path = reference_path(prefix, keys[prefix])
        values = load_reference_logps(path, lows[0].num_pairs)
        for low in lows:
            low.reference = values
        used.append(path)
        if prefix not in missing and setup.is_logging_rank:
            say(f"reference log-probs: reusing {path.name} ({len(values):,} pairs of {Path(prefix).name})")
    return used
