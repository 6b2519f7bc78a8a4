"""Where a branch run starts: ``checkpoint.branch_from`` resolved to a training checkpoint, its
step and the learning rate the source run had at that step.

A branch takes the source's model and optimizer state and nothing else; the source is only read.
Once the branch has saved a checkpoint of its own, the branch point is read back from that
checkpoint's ``train_state.branch`` (so a resumed branch does not need the source any more).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megasmol.ckpt.branch import locate_source
from megasmol.ckpt.checkpoint import CheckpointError, latest_iteration, read_metadata
from megasmol.config.typed import ConfigError, from_dict
from megasmol.train.schedules import ScheduleConfig, lr_at


@dataclass
class BranchPoint:
    source: Path
    """The source's iteration directory."""
    step: int
    """The source's step at the branch."""
    lr: float
    """The learning rate the source used for that step."""

    def to_json(self) -> dict:
        return {"source": str(self.source), "step": self.step, "lr": self.lr}


def _source_lr(meta: dict, where: Path) -> float:
    state = meta["train_state"]
    if "lr" in state:
        return float(state["lr"])
    # Written before train_state recorded it: the schedule is a pure function of the step.
    run = meta.get("run_config", {})
    try:
        schedule = from_dict(ScheduleConfig, run["schedule"], "schedule")
        return lr_at(schedule, state["step"], run["training"]["train_steps"])
    except (KeyError, ConfigError, ValueError) as exc:
        raise CheckpointError(f"{where}: no learning rate recorded and none computable ({exc})") from None


def branch_point(config) -> Optional[BranchPoint]:
    """The branch point of this run: from its own latest checkpoint when it has one (resume), else
    from the source named by ``checkpoint.branch_from``; None for a run that is not a branch."""
    if config.checkpoint.branch_from is None:
        return None
    own = latest_iteration(config.checkpoint_dir) if config.checkpoint.resume else None
    if own is not None:
        recorded = read_metadata(own).get("train_state", {}).get("branch")
        if recorded is not None:
            return BranchPoint(Path(recorded["source"]), int(recorded["step"]), float(recorded["lr"]))
    source = locate_source(config)
    if source.parent.resolve() == config.checkpoint_dir.resolve():
        raise ConfigError(f"checkpoint.branch_from names this run's own checkpoint directory "
                          f"({config.checkpoint_dir}); a branch needs its own run_dir")
    meta = read_metadata(source)
    if "train_state" not in meta:
        raise ConfigError(f"checkpoint.branch_from: {source} is a weights-only checkpoint with no "
                          "optimizer state (use checkpoint.init_from for it)")
    return BranchPoint(source, int(meta["train_state"]["step"]), _source_lr(meta, source))


def apply_to_schedule(config, point: Optional[BranchPoint]) -> None:
    """``schedule.kind: decay`` starts from the source's LR at the branch step."""
    if point is None or config.schedule.kind != "decay":
        return
    if config.schedule.min_lr > point.lr:
        raise ConfigError(f"schedule.min_lr={config.schedule.min_lr:g} is above the LR the source "
                          f"had at step {point.step} ({point.lr:g}): nothing to decay")
    config.schedule.lr = point.lr
