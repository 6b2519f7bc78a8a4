"""Where the checkpoint is, from the directory a person gave: a checkpoint root (its ``latest``),
an iteration directory, or a run directory (the checkpoint root it keeps: ``checkpoints/``, or the
``checkpoint.dir`` its ``run_config.json`` names), the ``output_dir`` habit of Hugging Face and
torchtitan users. Read from the directory's files alone, without torch, so that a directory that
holds no checkpoint is one line before anything heavy loads, saying what to give instead (``--hf``
for a Hugging Face model directory, the checkpoint found below it, ...).

:func:`megasmol.ckpt.checkpoint.resolve`, the resolver every command and config field reads a
checkpoint through, starts from :func:`checkpoint_root`; the CLI checks every ``--checkpoint``
with :func:`checkpoint_problem` right after parsing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megasmol.utils.fs import shown

META_FILE = "megasmol.json"
LATEST_FILE = "latest"
RUN_CHECKPOINTS = "checkpoints"
"""A run directory's checkpoint root when its config sets no ``checkpoint.dir``."""


def holds_checkpoint(path: Path) -> bool:
    """``path`` is an iteration directory or a checkpoint root (whether or not its ``latest``
    names a complete iteration: the resolver says what is wrong with it)."""
    return (path / META_FILE).is_file() or (path / LATEST_FILE).is_file()


def run_checkpoints(run_dir: Path) -> Optional[Path]:
    """The checkpoint root of run directory ``run_dir`` (the ``checkpoint.dir`` its
    ``run_config.json`` names, else its ``checkpoints/``), or None when it is no run directory."""
    try:
        saved = json.loads((run_dir / "run_config.json").read_text())
    except (OSError, ValueError):
        saved = None
    section = saved.get("checkpoint", {}) if isinstance(saved, dict) else {}
    custom = section.get("dir") if isinstance(section, dict) else None
    if isinstance(custom, str) and custom.startswith("s3://"):  # its local (staging) copy
        custom = section.get("staging_dir")
    if isinstance(custom, str) and custom:
        root = Path(custom).expanduser()
        return root if root.is_absolute() else (Path(saved.get("config_dir") or run_dir) / root).resolve()
    nested = run_dir / RUN_CHECKPOINTS
    return nested if nested.is_dir() else None


def checkpoint_root(path: Path) -> Path:
    """``path`` when it holds a checkpoint itself; for a run directory, the checkpoint root it
    keeps (which may hold none yet); else ``path``."""
    if holds_checkpoint(path):
        return path
    return run_checkpoints(path) or path


def _iterations(root: Path) -> list[Path]:
    """The complete ``iter_*`` directories of ``root``, newest first."""
    found = [p for p in root.glob("iter_???????") if (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _below(path: Path, depth: int = 4, budget: int = 2000) -> list[Path]:
    """Checkpoint roots under ``path`` (a ``latest`` file at most ``depth`` levels down), the
    nearest level that has any; hidden folders and iteration directories are not entered, and
    the search stops after ``budget`` folders, so a large tree answers at once."""
    level, seen = [path], 0
    for _ in range(depth):
        found, below = [], []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:
                continue
            for child in children:
                seen += 1
                if (child / LATEST_FILE).is_file():
                    found.append(child)
                elif not child.name.startswith((".", "iter_")):
                    below.append(child)
            if seen > budget:
                return found
        if found:
            return found
        level = below
    return []


def not_a_checkpoint(path: Path, hf_option: Optional[bool] = None) -> str:
    """Why directory ``path``, which holds no checkpoint (nor does the run directory it may be),
    is no checkpoint, and what to give instead. ``hf_option``: the command also takes ``--hf``
    (True), does not (False), or the path comes from elsewhere (None, a config field)."""
    where = shown(path)
    root = run_checkpoints(path)
    if root is not None:
        saved = _iterations(root) if root.is_dir() else []
        if saved:
            return (f"{where}: its checkpoints ({shown(root)}) have no {LATEST_FILE} file; give one "
                    f"of its complete iterations, e.g. {shown(saved[0])}")
        return (f"{where}: a run directory whose checkpoints ({shown(root)}) hold none yet: the run "
                "has not saved one (checkpoint.interval, or at the end of training)")
    if (path / "config.json").is_file():
        if hf_option:
            instead = f"use --hf {where}"
        elif hf_option is False:
            instead = ("this command reads megasmol checkpoints: convert it with `megasmol import-hf "
                       f"--hf {where} --out DIR` and give DIR")
        else:
            instead = f"convert it with `megasmol import-hf --hf {where} --out DIR` and give DIR"
        return f"{where}: a Hugging Face model directory (config.json), not a megasmol checkpoint; {instead}"
    saved = _iterations(path)
    if saved:
        return (f"{where}: holds checkpoint iterations but no {LATEST_FILE} file; give one of them, "
                f"e.g. {shown(saved[0])}")
    below = _below(path)
    if below:
        named = ", ".join(shown(p) for p in below[:3]) + (", ..." if len(below) > 3 else "")
        return f"{where}: not a megasmol checkpoint itself; checkpoints below it: {named}"
    return (f"{where}: not a megasmol checkpoint (no {META_FILE} and no {LATEST_FILE} file): give a "
            "checkpoint root, an iter_* directory or a run directory")


def checkpoint_problem(value: str, hf_option: Optional[bool] = None) -> Optional[str]:
    """None when ``value`` names a checkpoint (or a run directory that keeps one), else what is
    wrong, as :func:`megasmol.ckpt.checkpoint.resolve` would say it, without loading torch."""
    path = Path(value).expanduser()
    if not path.exists():
        return f"{value}: no such file or directory"
    if not path.is_dir():
        return f"{value}: a file, not a checkpoint directory"
    if holds_checkpoint(checkpoint_root(path)):
        return None
    if path.name.endswith(".partial"):
        return f"{value}: an interrupted save (.partial), not a checkpoint"
    return not_a_checkpoint(path, hf_option)
