"""Training checkpoints: model + optimizer + RNG streams + loop state, and their housekeeping.

A training checkpoint is an ordinary megasmol checkpoint (``checkpoint.py``: export, generate
and ``init_from`` read it like any other) with three more things inside:

* the optimizer states, in Megatron-Core's fully reshardable layout, so a run can resume under a
  different TP/PP/DP layout;
* each rank's RNG streams (Python, NumPy, torch, Megatron's tensor-parallel tracker), restored
  only when the layout is the same (other layouts draw fresh streams, as Megatron-LM does);
* ``train_state`` in ``megasmol.json``: step, consumed tokens, spike window, skipped ranges;
  next to the resolved run config.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from megasmol.ckpt.checkpoint import (
    CheckpointError,
    describe_error,
    describe_load_error,
    latest_iteration,
    load_errors,
    read_metadata,
    resolve,
    save_checkpoint,
)
from megasmol.utils.faults import NO_FAULTS

log = logging.getLogger(__name__)

OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _layout_now() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "context_parallel": ps.get_context_parallel_world_size()}


def _rng_sharded_object(states):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "megasmol.rng_state", states,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def capture_rng() -> dict:
    """Every RNG stream as tensors and numbers only, so a resume loads it without unpickling
    code (see ``trust.py``)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": dict(get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    py, npy = state["python"], state["numpy"]
    if isinstance(py, tuple):  # written by megasmol before RNG states were tensors
        random.setstate(py)
        np.random.set_state(npy)
    else:
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


SAME_LAYOUT_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""The distributed optimizer's own buckets, each rank its shard: no gather on save, but loadable
only under the same TP/PP layout (what a local copy needs: ``train/local_copies.py``)."""


def _extra_to_save(optimizer, model_sharded: dict, optimizer_format: dict = OPTIMIZER_FORMAT) -> dict:
    """What a training checkpoint adds to the model's sharded state dict when it is written."""
    return {"optimizer": optimizer.sharded_state_dict(model_sharded, metadata=optimizer_format),
            "rng_state": _rng_sharded_object([capture_rng()])}


def training_state_to_save(model, optimizer, optimizer_format: dict = OPTIMIZER_FORMAT) -> dict:
    """Collective: the sharded state dict of a training checkpoint (model, optimizer, RNG), as
    ``save_training_checkpoint`` writes it; also what a local copy keeps (``train/local_copies.py``,
    with :data:`SAME_LAYOUT_OPTIMIZER_FORMAT`)."""
    sharded = model.sharded_state_dict()
    sharded.update(_extra_to_save(optimizer, sharded, optimizer_format))
    return sharded


def training_state_request(model, optimizer, with_rng: bool = True,
                           optimizer_format: dict = OPTIMIZER_FORMAT) -> dict:
    """The sharded state dict a load fills in (model, optimizer, and with ``with_rng`` the RNG)."""
    sharded = model.sharded_state_dict()
    _materialize_adam_state(optimizer)
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                        metadata=optimizer_format)
    if with_rng:
        sharded["rng_state"] = _rng_sharded_object([None])
    return sharded


def apply_training_state(model, optimizer, state: dict) -> bool:
    """Load a filled-in :func:`training_state_request` into the model, optimizer and RNG streams;
    whether it held RNG streams."""
    optimizer_state = state.pop("optimizer")
    rng_state = state.pop("rng_state", None)
    model.load_state_dict(state, strict=True)
    _load_optimizer_state(optimizer, optimizer_state)
    if rng_state is not None:
        restore_rng(rng_state[0])
    return rng_state is not None


def save_training_checkpoint(model, optimizer, root: Path, step: int, metadata: dict, *,
                             tokenizer_source=None, async_queue=None, on_commit=None,
                             faults=NO_FAULTS) -> Path:
    """Collective. ``model`` is this rank's (unwrapped) model chunk; see ``save_checkpoint`` for
    ``async_queue``, ``on_commit`` and ``faults``."""
    def extra(model_sharded: dict) -> dict:
        return _extra_to_save(optimizer, model_sharded)

    metadata = {**metadata, "written_with": _layout_now()}
    return save_checkpoint(model, root, step, metadata, extra_sharded_state=extra,
                           tokenizer_source=tokenizer_source, async_queue=async_queue,
                           on_commit=on_commit, faults=faults)


def _materialize_adam_state(optimizer) -> None:
    """Give a fresh torch Adam its (zero) states before a load, as its first step would.

    Megatron's distributed optimizer builds the load request from its current state, and torch's
    Adam creates state lazily on the first step; Transformer Engine's and Apex's fused Adam do not
    need this.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` that survives Megatron-Core 0.16.1's torch-Adam path.

    With torch's Adam (no Transformer Engine or Apex), the fully reshardable loader leaves the
    per-parameter ``step`` out of the tensors it copies but then copies every key the inner
    state has, ``step`` included (KeyError). For the duration of the load, each distributed
    optimizer copies its states without ``step``, which the loader has already set from the
    checkpoint's parameter groups. That loader also gives every parameter the same ``step``
    tensor object, which torch's Adam then increments once per parameter; each gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        original = inner._set_main_param_and_optimizer_states

        def without_step(model_param, tensors, inner=inner, original=original):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            param_state = inner.optimizer.state[main_param]
            step = param_state.pop("step", None)
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    param_state["step"] = step

        inner._set_main_param_and_optimizer_states = without_step
        patched.append(inner)
    try:
        optimizer.load_state_dict(state)
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        for param_state in getattr(torch_optimizer, "state", {}).values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def load_training_checkpoint(model, optimizer, path: str | Path) -> dict:
    """Restore model, optimizer and (same layout only) RNG; returns the checkpoint's metadata."""
    from megatron.core import dist_checkpointing

    meta = read_metadata(path)
    iteration = resolve(path)
    if "train_state" not in meta:
        raise CheckpointError(f"{iteration}: a weights-only checkpoint has no optimizer state to "
                              "resume from (use checkpoint.init_from for it)")
    same_layout = meta.get("written_with") == _layout_now()

    sharded = training_state_request(model, optimizer, with_rng=same_layout)
    _check_shapes(iteration, sharded)
    try:
        try:
            state = dist_checkpointing.load(sharded, str(iteration))
        except load_errors() as exc:
            reason = describe_error(exc)
            if not (same_layout and "rng_state" in reason and "not plain data" in reason):
                raise
            # Written before RNG states were plain tensors: resume with fresh streams rather
            # than unpickle them (see trust.py).
            log.warning("%s: its RNG state is not plain data (an older megasmol?); RNG streams "
                        "start fresh", iteration)
            state = dist_checkpointing.load(training_state_request(model, optimizer, with_rng=False),
                                            str(iteration))
    except load_errors() as exc:  # Megatron and DCP raise several types
        raise CheckpointError(f"{iteration}: cannot resume from it: "
                              f"{describe_load_error(iteration, exc)}") from None
    if not apply_training_state(model, optimizer, state) and not same_layout:
        log.warning("%s was written under layout %s; RNG streams start fresh under %s",
                    iteration, meta.get("written_with"), _layout_now())
    return meta


def _check_shapes(iteration: Path, sharded: dict) -> None:
    """Name the first model tensor whose global shape differs from the checkpoint's (a changed
    model spec), before DCP fails on it somewhere deep inside."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megasmol.ckpt.reader import CheckpointReader

    stored = CheckpointReader(iteration)
    known = set(stored.keys())
    for value in sharded.values():
        if isinstance(value, ShardedTensor) and value.key in known:
            if tuple(stored.shape(value.key)) != tuple(value.global_shape):
                raise CheckpointError(
                    f"{iteration}: tensor {value.key} has shape {tuple(stored.shape(value.key))} "
                    f"in the checkpoint but {tuple(value.global_shape)} in this run's model "
                    "(the model spec changed since it was written)")


def _is_finite_checkpoint(path: Path) -> bool:
    try:
        return read_metadata(path).get("train_state", {}).get("weights_finite", True)
    except CheckpointError:
        return False


def prune_checkpoints(root: Path, keep_last: int, keep: Collection[Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete iterations; never the latest, never the
    newest one whose weights were finite when saved (the one to go back to after NaNs), and never
    one in ``keep`` (e.g. being uploaded)."""
    if keep_last < 1:
        return []
    latest = latest_iteration(root)
    complete = sorted(p for p in root.glob("iter_???????") if p.is_dir())
    kept = complete[-keep_last:]
    protected = {latest, *(root / Path(p).name for p in keep)}
    if not any(_is_finite_checkpoint(p) for p in kept):
        finite = [p for p in complete if _is_finite_checkpoint(p)]
        protected.update(finite[-1:])
    doomed = [p for p in complete[:-keep_last] if p not in protected]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
