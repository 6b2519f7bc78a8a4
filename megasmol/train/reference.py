"""Reference log-probabilities for preference training, computed once and stored beside the data.

DPO and APO compare the policy's log-probability of each completion with a frozen reference
model's. Instead of holding a second model and running its forward pass every step (TRL's
default), the reference checkpoint's log-probs of every pair are computed by one forward-only
pass over the dataset, in the run's own parallel layout, and written to
``PREFIX.ref-<key>.npy`` ([pairs, 2] float64: chosen, rejected). The key hashes the reference
checkpoint (its metadata and file sizes), the data (indices, masks, description) and the
precision, so a rerun or a resumed run reuses the file, and a different reference or changed
data gets a new one. Written on rank 0 under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megasmol.config.typed import ConfigError
from megasmol.utils.fs import atomic_save_npy, shown

log = logging.getLogger(__name__)


def _hash_file(digest, path: Path, limit: int = 1 << 20) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(limit))
        if size > 2 * limit:
            handle.seek(size - limit)
            digest.update(handle.read(limit))


def reference_key(prefix: str, reference: Path, params_dtype: torch.dtype) -> str:
    """A short hash of the reference checkpoint, the preference data and the precision."""
    from megasmol.ckpt.checkpoint import META_FILE, resolve
    from megasmol.data.chat.prepare import mask_prefix
    from megasmol.data.preference.prepare import description_path

    iteration = resolve(reference)
    digest = hashlib.sha256(str(params_dtype).encode())
    for name in (META_FILE, ".metadata"):
        _hash_file(digest, iteration / name)
    for path in sorted(iteration.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    for path in (Path(f"{prefix}.idx"), Path(f"{prefix}.bin"), Path(f"{mask_prefix(prefix)}.idx"),
                 Path(f"{mask_prefix(prefix)}.bin"), description_path(prefix)):
        _hash_file(digest, path)
    return digest.hexdigest()[:16]


def reference_path(prefix: str, key: str) -> Path:
    return Path(f"{prefix}.ref-{key}.npy")


def pair_datasets(stages) -> dict[str, list]:
    """{prefix: its PairTokens objects} over every split of every stage."""
    from megasmol.data.preference.dataset import PairTokens

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

    from megasmol.data.chat.dataset import open_chat_dataset
    from megasmol.data.loader import _collate
    from megasmol.data.masking import device_inputs
    from megasmol.runtime.distributed import current_device
    from megasmol.train.objectives import document_logps
    from megasmol.runtime.pipeline import forward_only_outputs
    from megasmol.utils.progress import progress_bar

    data = open_chat_dataset(prefix, seq_length, token_ids, packing=packing, cache_dir=cache_dir)
    low, plan = data.dataset, data.plan
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


def _load(path: Path, pairs: int) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable reference log-probs ({exc}); delete it to recompute") from None
    if values.shape != (pairs, 2) or not np.isfinite(values).all():
        raise ConfigError(f"{path}: reference log-probs of shape {values.shape} (or non-finite) for "
                          f"{pairs} pairs; delete it to recompute")
    return values


def attach_reference_logps(setup, reference: Path, *, weights_after=None, show_progress=True,
                           say=print) -> list[Path]:
    """Give every preference dataset of ``setup`` its reference log-probs, computing the missing
    ones with ``reference``'s weights loaded into the model (then ``weights_after``, when given,
    is loaded back). Collective. Returns the files used."""
    from megasmol.ckpt.checkpoint import load_model_weights
    from megasmol.data.loader import TokenIds

    config = setup.config
    found = pair_datasets(setup.batches.stages)
    keys = {prefix: reference_key(prefix, reference, setup.params_dtype) for prefix in found}
    missing = [[p for p in found if not reference_path(p, keys[p]).is_file()]]
    torch.distributed.broadcast_object_list(missing, src=0)  # every rank decides as rank 0 saw it
    missing = missing[0]
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
                atomic_save_npy(path, values)
                say(f"reference log-probs: {len(values):,} pairs of {Path(prefix).name} scored by "
                    f"{shown(reference)} in {time.perf_counter() - started:.1f}s -> {path.name}")
            torch.distributed.barrier()
        if weights_after is not None:
            load_model_weights(setup.model, weights_after)
    used = []
    for prefix, lows in found.items():
        path = reference_path(prefix, keys[prefix])
        values = _load(path, lows[0].num_pairs)
        for low in lows:
            low.reference = values
        used.append(path)
        if prefix not in missing and setup.is_logging_rank:
            say(f"reference log-probs: reusing {path.name} ({len(values):,} pairs of {Path(prefix).name})")
    return used
