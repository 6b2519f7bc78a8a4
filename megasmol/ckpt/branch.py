"""``checkpoint.branch_from`` resolved to a training checkpoint's iteration directory (the branch
point itself, its step and learning rate, is ``train/branch.py``'s)."""

from __future__ import annotations

from pathlib import Path

from megasmol.ckpt.checkpoint import iteration_dirname, resolve
from megasmol.ckpt.locate import checkpoint_root
from megasmol.config.typed import ConfigError


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
        root = checkpoint_root(path)  # a run directory keeps its checkpoints in a root of its own
        iteration = root / iteration_dirname(int(step))
        if not iteration.is_dir():
            have = sorted(int(p.name[5:]) for p in root.glob("iter_???????") if p.is_dir())
            raise ConfigError(f"checkpoint.branch_from: {root} has no checkpoint at step {step} "
                              f"(it has steps {have or 'none'})")
        return resolve(iteration)
    return resolve(path)  # a checkpoint root, an iteration or a run directory
