"""The loop's side of a checkpoint: what each save records about the run (``megasmol.json``), and
reading it back to resume the same run or to branch a new one from another run's state."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megasmol.config.identity import changed_fields
from megasmol.train.guard import StepGuard
from megasmol.train.schedules import lr_at
from megasmol.train.state import TrainState
from megasmol.train.step import any_rank

if TYPE_CHECKING:
    from megasmol.train.branch import BranchPoint
    from megasmol.train.callbacks import Console
    from megasmol.train.checkpointing import Checkpointer
    from megasmol.train.setup import TrainingSetup


def checkpoint_metadata(setup: TrainingSetup, state: TrainState, guard: StepGuard, total_steps: int) -> dict:
    """Collective (every rank says whether its weights are finite): ``megasmol.json`` for a
    checkpoint of ``state.step``."""
    local = all(bool(torch.isfinite(p).all()) for p in setup.model.parameters())
    weights_finite = not any_rank(not local)
    config, step = setup.config, state.step
    return {"model_spec": setup.spec.to_dict(),
            "params_dtype": str(setup.params_dtype).removeprefix("torch."),
            "run_config": config.to_dict(),
            "train_state": state.to_json(
                spike_window=guard.spikes.state(), weights_finite=weights_finite,
                lr=lr_at(config.schedule, step, total_steps) if step else None,
                branch=setup.branch.to_json() if setup.branch else None)}


def resume(checkpoints: Checkpointer, path: Path, setup: TrainingSetup, guard: StepGuard, console: Console,
           skip_batches: list[list[int]]) -> TrainState:
    """Load ``path`` into the model, optimizer and step guard; the train state it was saved at
    (``skip_batches``: the ranges to keep skipping besides those it recorded)."""
    meta = checkpoints.restore(path)
    changed = changed_fields(meta.get("run_config", {}), setup.config.to_dict())
    if changed:
        console.print(f"note: the config differs from the one {path.name} was written with: "
                      + ", ".join(changed))
    return train_state_from(meta, setup, guard, skip_batches)


def train_state_from(meta: dict, setup: TrainingSetup, guard: StepGuard,
                     skip_batches: list[list[int]]) -> TrainState:
    """The loop's state from a checkpoint's (or a local copy's) metadata; the step guard's spike
    window restored with it."""
    saved = meta["train_state"]
    guard.load_state_dict({"spike_window": saved.get("spike_window")})
    return TrainState.from_json(saved, skip_batches=skip_batches,
                                tokens_through=setup.batches.tokens_through)


def branch(checkpoints: Checkpointer, point: BranchPoint, setup: TrainingSetup, console: Console,
           total_steps: int) -> int:
    """Start from the source's model and optimizer state (step, data and schedule are this run's);
    returns the source's consumed tokens, which this run's go on from (so ``compare`` lines the
    two runs up)."""
    meta = checkpoints.restore(point.source)
    schedule = setup.config.schedule
    console.print(f"branched from {point.source} (its step {point.step}, lr {point.lr:.3g}): "
                  f"model and optimizer state; schedule {schedule.kind} from lr {schedule.lr:.3g} "
                  f"to {schedule.min_lr:.3g} over {total_steps} steps")
    return meta["train_state"].get("consumed_tokens") or 0
