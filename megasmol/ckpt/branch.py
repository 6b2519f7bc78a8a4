"""``checkpoint.branch_from`` resolved to a training checkpoint's iteration directory (the branch
point itself, its step and learning rate, is ``train/branch.py``'s)."""

from __future__ import annotations

from pathlib import Path

from megasmol.ckpt.checkpoint import CheckpointError, iteration_dirname, latest_iteration, resolve
from megasmol.config.typed import ConfigError


def _checkpoint_root(run_or_root: Path) -> Path:
    """A run directory holds its checkpoints in ``checkpoints/``; a checkpoint root holds them."""
    nested = run_or_root / "checkpoints"
    return nested if nested.is_dir() else run_or_root


def locate_source(config) -> Path:
    """The iteration directory ``checkpoint.branch_from`` names, or an error naming the field."""
    text = config.checkpoint.branch_from
    where, _, step = text.rpartition("@") if "@" in text else (text, "", "")
    path = config.path(where)
    if not path.exists():
        raise ConfigError(f"checkpoint.branch_from: {path} does not exist")
    if step:
        if not step.isdigit():
            raise ConfigError(f"checkpoint.branch_from: {text!r}: the part after @ must be a step")
        root = _checkpoint_root(path)
        iteration = root / iteration_dirname(int(step))
        if not iteration.is_dir():
            have = sorted(int(p.name[5:]) for p in root.glob("iter_???????") if p.is_dir())
            raise ConfigError(f"checkpoint.branch_from: {root} has no checkpoint at step {step} "
                              f"(it has steps {have or 'none'})")
        return resolve(iteration)
    try:
        return resolve(path)
    except CheckpointError:
        nested = latest_iteration(_checkpoint_root(path)) if (path / "checkpoints").is_dir() else None
        if nested is None:
            raise
        return nested
