"""The files of a masked-documents prefix (``PREFIX`` is ``--out``), beside each other:

* ``PREFIX.bin/.idx`` -- the tokens, a Megatron-Core indexed dataset;
* ``PREFIX_lossmask.bin/.idx`` -- the aligned uint8 loss mask, an indexed dataset of the same
  lengths;
* ``PREFIX.tokenizer/`` -- the tokenizer the tokens were made with;
* the description (:mod:`descriptions`) and ``PREFIX.stats.json`` (the same record).
"""

from __future__ import annotations

from pathlib import Path

MASK_SUFFIX = "_lossmask"


def mask_prefix(prefix: str | Path) -> str:
    return f"{prefix}{MASK_SUFFIX}"


def tokenizer_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.tokenizer")


def stats_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.stats.json")


def prefix_files(prefix: str | Path, description: Path) -> list[Path]:
    """Every output of a prefix but its stats (the token ``.idx`` second: it is renamed last)."""
    return [Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), Path(f"{mask_prefix(prefix)}.bin"),
            Path(f"{mask_prefix(prefix)}.idx"), description, tokenizer_path(prefix)]
