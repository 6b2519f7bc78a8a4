"""Checkpoint averaging and linear merging, one tensor slice at a time.

``average_checkpoints`` reads every input's weights through ``CheckpointReader`` (global tensors,
so the inputs may come from any TP/PP layout), one layer of one tensor at a time, sums them in
float64 with the given weights (so k copies of one checkpoint average to it exactly), and writes
the result into a whole-model buffer in the inputs' parameter dtype. Peak memory is therefore one
model in that dtype plus a block of at most ``BLOCK_ELEMENTS`` per input; the
output is an ordinary weights-only megasmol checkpoint (export, generate, eval and
``checkpoint.init_from`` read it), in ``OUT/avg_iter_STEP-STEP`` (:func:`averaged_dirname`: no
training step of that number was ever saved as it) with ``OUT/latest`` naming it.

Two uses, as the playbook describes them: equal weights over the checkpoints of a WSD stable
phase (read a model's quality without decaying it), and any weights for a linear merge (SmolLM3's
release: a soup of preference-tuned checkpoints at 0.9 with the mid-training checkpoint at 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megasmol.ckpt.checkpoint import (
    CheckpointError,
    check_output_dir,
    read_metadata,
    resolve,
    save_checkpoint,
    tokenizer_dir,
)
from megasmol.ckpt.reader import CheckpointReader
from megasmol.ckpt.weights import check_weights
from megasmol.config.typed import ConfigError

# Spec fields that do not change what the weights mean.
SPEC_FIELDS_IGNORED = ("name", "source", "attention_backend")
# Elements per block read and accumulated at once (float64: 128 MiB).
BLOCK_ELEMENTS = 1 << 24


@dataclass
class AverageReport:
    path: Path
    inputs: list[Path]
    weights: list[float]
    tensors: int
    steps: list[int] = field(default_factory=list)
    """Each input's training step, in the inputs' order."""

    def describe(self) -> str:
        """What the written checkpoint is, in words: ``an equal-weight average of 2 checkpoints
        (steps 10, 20)`` or ``a linear merge of 2 checkpoints (steps 200, 150; weights 0.9,
        0.1)``."""
        equal = len(set(self.weights)) == 1
        steps = ", ".join(str(s) for s in self.steps)
        weights = "" if equal else "; weights " + ", ".join(f"{w:g}" for w in self.weights)
        kind = "an equal-weight average" if equal else "a linear merge"
        return f"{kind} of {len(self.inputs)} checkpoints (steps {steps}{weights})"


def averaged_dirname(steps: Sequence[int]) -> str:
    """The averaged checkpoint's directory: named for what it is and what it came from, never an
    ``iter_STEP`` a training run would have written (``avg_iter_0000010-0000020``: the inputs'
    steps in order; ``avg12_iter_0000500-0006000`` for more than four: their count and range)."""
    if len(steps) <= 4:
        return "avg_iter_" + "-".join(f"{s:07d}" for s in steps)
    return f"avg{len(steps)}_iter_{min(steps):07d}-{max(steps):07d}"


def shared_spec(paths: Sequence[Path]) -> tuple[dict, list[dict]]:
    """The inputs' common model spec, or a ConfigError naming the first field that differs."""
    metas = [read_metadata(p) for p in paths]
    first = metas[0]["model_spec"]
    for path, meta in zip(paths[1:], metas[1:]):
        spec = meta["model_spec"]
        for key in sorted(set(first) | set(spec)):
            if key in SPEC_FIELDS_IGNORED:
                continue
            if first.get(key) != spec.get(key):
                raise ConfigError(f"{path}: model_spec.{key} is {spec.get(key)!r} but "
                                  f"{paths[0]} has {first.get(key)!r}; only checkpoints of one "
                                  "model spec can be averaged")
    return first, metas


class _OwnedShards:
    """The model's sharded state dict with every shard in storage of its own, the model's
    parameters released as their shards are copied out.

    Megatron-Core saves a shard that is a view (the gate and up halves of a SwiGLU ``fc1``) by
    cloning it first, for every such shard at once: on SmolLM3-3B that is half the model again.
    Splitting each parameter here, one at a time, and freeing it keeps the save at one model.
    """

    def __init__(self, model):
        self.model = model

    def sharded_state_dict(self) -> dict:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        sharded = self.model.sharded_state_dict()
        apply_factories(sharded)
        owners = {p.untyped_storage().data_ptr(): p for p in self.model.parameters()}
        views: dict[int, list] = {}
        whole = set()
        for shard in nested_values(sharded):
            if isinstance(shard, ShardedTensor) and shard.data is not None:
                data, pointer = shard.data, shard.data.untyped_storage().data_ptr()
                if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                    views.setdefault(pointer, []).append(shard)
                else:
                    whole.add(pointer)
        for pointer, shards in views.items():
            for shard in shards:
                shard.data = shard.data.clone()
            owner = owners.get(pointer)
            if owner is not None and pointer not in whole:  # only views of it: release it
                owner.data = torch.empty(0, dtype=owner.dtype)
        return sharded


def _row_blocks(target: torch.Tensor) -> list[slice]:
    """Slices of ``target``'s first dimension of at most BLOCK_ELEMENTS elements each."""
    if target.dim() == 0 or target.numel() == 0:
        return [slice(None)]
    per_row = max(1, target.numel() // target.shape[0])
    step = max(1, BLOCK_ELEMENTS // per_row)
    return [slice(r, min(r + step, target.shape[0])) for r in range(0, target.shape[0], step)]


def _average_block(readers, weights, key: str, layer: Optional[int], target: torch.Tensor,
                   rows: slice) -> None:
    """target[rows] = sum_i w_i * input_i[rows], accumulated in float64 (so averaging k copies
    of one checkpoint gives it back bit for bit), rounded once to the target's dtype."""
    block = target[rows]
    start = rows.start or 0
    if layer is None:
        offsets = (start,) + (0,) * (block.dim() - 1) if block.dim() else ()
        sizes = tuple(block.shape)
    else:
        offsets = (layer, start) + (0,) * (block.dim() - 1) if block.dim() else (layer,)
        sizes = (1, *block.shape)
    total = torch.zeros(block.shape, dtype=torch.float64)
    for reader, weight in zip(readers, weights):
        stored = reader.shape(key)
        expected = tuple(target.shape) if layer is None else (stored[0], *target.shape)
        if tuple(stored) != expected:
            raise CheckpointError(f"{reader.path}: {key} has shape {tuple(stored)}, expected "
                                  f"{expected}")
        part = reader.read_slice(key, offsets, sizes)
        total.add_(part.reshape(block.shape).to(torch.float64), alpha=weight)
        del part
    block.copy_(total)


def average_checkpoints(checkpoints: Sequence[str | Path], out: str | Path, *,
                        weights: Optional[Sequence[float]] = None, normalize: bool = True,
                        dtype: Optional[torch.dtype] = None, progress: bool = False) -> AverageReport:
    """Write ``sum(w_i * checkpoint_i)`` as a checkpoint under ``out``."""
    from megasmol.model.load import canonical_parameters, single_process_model
    from megasmol.model.spec import model_spec_from_dict

    paths = [resolve(c) for c in checkpoints]
    weights = check_weights(weights, len(paths), normalize)
    out = check_output_dir(out, sources=tuple(paths))
    spec_dict, metas = shared_spec(paths)
    readers = [CheckpointReader(p) for p in paths]
    if dtype is None:
        dtype = readers[0].dtype("embedding.word_embeddings.weight")
    model = single_process_model(model_spec_from_dict(spec_dict), dtype, initialize=False)
    targets = canonical_parameters(model)
    for reader in readers:
        missing = sorted({key for key, _ in targets} - set(reader.keys()))
        if missing:
            raise CheckpointError(f"{reader.path}: tensor {missing[0]} is missing")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(t.numel() for t in targets.values()), unit="param", unit_scale=True,
                   desc="average")
    with torch.no_grad():
        for (key, layer), target in targets.items():
            for rows in _row_blocks(target):
                _average_block(readers, weights, key, layer, target, rows)
                if bar is not None:
                    bar.update(target[rows].numel())
    if bar is not None:
        bar.close()
    sources = [{"checkpoint": str(p), "step": m.get("step"), "weight": w}
               for p, m, w in zip(paths, metas, weights)]
    metadata = {"model_spec": spec_dict, "params_dtype": str(dtype).removeprefix("torch."),
                "averaged_from": sources,
                "written_with": {"tensor_parallel": 1, "pipeline_parallel": 1}}
    steps = [int(m.get("step", 0)) for m in metas]
    tokenizer = next((t for t in (tokenizer_dir(p) for p in paths) if t is not None), None)
    path = save_checkpoint(_OwnedShards(model), out, max(steps), metadata, tokenizer_source=tokenizer,
                           name=averaged_dirname(steps))
    return AverageReport(path=path, inputs=paths, weights=weights, tensors=len(targets), steps=steps)
