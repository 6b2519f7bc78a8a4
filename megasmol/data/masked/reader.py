"""Opening a masked-documents prefix: its tokens and loss mask, checked to match."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.masked.descriptions import DatasetKind
from megasmol.data.masked.layout import mask_prefix


def open_masked_documents(prefix: str, kind: DatasetKind):
    """(tokens, mask): a prefix's token and aligned loss-mask ``IndexedDataset``s, or one error
    naming the file that is missing or does not match (and ``kind``'s command to prepare it
    again)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = IndexedDataset(str(prefix))
    mask = mask_prefix(prefix)
    if not (Path(mask + ".bin").is_file() and Path(mask + ".idx").is_file()):
        raise ConfigError(f"{kind.name} dataset {prefix}: its loss mask {mask}.bin/.idx is missing; "
                          f"prepare it again with {kind.command}")
    masks = IndexedDataset(mask)
    if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
        raise ConfigError(f"{kind.name} dataset {prefix}: {mask}.idx does not match {prefix}.idx "
                          f"(lengths differ); prepare it again with {kind.command}")
    return tokens, masks
