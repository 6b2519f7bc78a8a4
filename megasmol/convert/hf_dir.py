"""What ``--hf DIR`` must be: a Hugging Face model directory. Checked before anything heavy
loads, with one line saying what was given instead (a megasmol checkpoint, a folder without
``config.json``)."""

from __future__ import annotations

from pathlib import Path

from megasmol.ckpt.locate import holds_checkpoint, run_checkpoints
from megasmol.config.typed import ConfigError


def check_hf_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--hf {path}: no such directory (a Hugging Face model directory, e.g. "
                          "from megasmol export-hf)")
    if holds_checkpoint(path) or any(path.glob("iter_*")) or run_checkpoints(path) is not None:
        what = "checkpoint" if holds_checkpoint(path) or any(path.glob("iter_*")) else "run directory"
        raise ConfigError(f"--hf {path}: this is a megasmol {what}, not a Hugging Face model "
                          f"directory: use --checkpoint {path}, or export it first with megasmol export-hf")
    if not (path / "config.json").is_file():
        raise ConfigError(f"--hf {path}: not a Hugging Face model directory (no config.json)")
    return path


def load_hf_causal_lm(path: str | Path, dtype=None):
    """The model in ``path`` through transformers, in eval mode (float32 unless ``dtype``), with
    no loading bar: the caller's own progress follows, and a bar for a few dozen tensors is noise."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32).eval()
