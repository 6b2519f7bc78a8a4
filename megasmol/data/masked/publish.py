"""Writing a masked-documents prefix so that it is whole or absent.

Every file is written under a ``.partial`` name and renamed when complete, the token ``.idx``
last: a prefix with an ``.idx`` is whole, and a whole prefix always has its mask and
description. A run that fails leaves nothing half-written behind; one that was killed leaves
``.partial`` files, removed by the next run on that prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.masked.layout import mask_prefix, prefix_files, stats_path
from megasmol.data.masked.summary import MaskedSummary
from megasmol.errors import OutputExists


def check_out_folder(out_prefix: str) -> None:
    """One line naming ``--out`` when its folder cannot be made (a part of it is a file) or lies
    in a checkpoint's iteration directory (refused as ``init``, ``import-hf`` and ``average``
    refuse it: the data would become part of that checkpoint)."""
    from megasmol.ckpt.checkpoint import enclosing_iteration
    from megasmol.utils.fs import existing_ancestor

    existing = existing_ancestor(Path(out_prefix).absolute().parent)
    if not existing.is_dir():
        raise ConfigError(f"--out {out_prefix}: {existing} is a file, not a folder; choose a prefix "
                          "in a folder")
    inside = enclosing_iteration(existing)
    if inside is not None:
        raise ConfigError(f"--out {out_prefix}: inside checkpoint {inside}, where the data would "
                          "become part of that checkpoint; choose a folder outside it")


def output_files(out_prefix: str, description: Path, overwrite: bool) -> tuple[Path, dict[Path, Path]]:
    """(prefix, {final: partial name}) of a prefix about to be written: the folder is created, an
    existing prefix is refused without ``overwrite``, and leftovers of an interrupted run are
    removed."""
    prefix = Path(out_prefix)
    check_out_folder(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    finals = prefix_files(prefix, description)
    if any(p.exists() for p in finals) and not overwrite:
        raise OutputExists(f"{prefix}.* already exists (use --overwrite to replace it)")
    partial = {p: p.with_name(p.name + ".partial") for p in finals}
    remove_partial(partial)
    return prefix, partial


def remove_partial(partial: dict[Path, Path]) -> None:
    for path in partial.values():
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def commit_outputs(partial: dict[Path, Path], idx: Path) -> None:
    """Rename every ``.partial`` output into place, the token ``idx`` last: a prefix with an
    ``.idx`` is whole, and an old ``.idx`` never pairs with new files."""
    idx.unlink(missing_ok=True)
    for final, tmp in partial.items():
        if final == idx:
            continue
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    os.replace(partial[idx], idx)


def publish(summary: MaskedSummary, prefix: Path, partial: dict[Path, Path], description: Path) -> None:
    """Write the description (and ``PREFIX.stats.json``) of a finished prefix, then rename every
    output into place, the token ``.idx`` last."""
    text = json.dumps(summary.record(prefix), indent=2) + "\n"
    partial[description].write_text(text)
    stats = stats_path(prefix)
    tmp = stats.with_name(stats.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, stats)
    commit_outputs(partial, Path(f"{prefix}.idx"))


class MaskedDocuments:
    """The token and loss-mask indexed datasets of a prefix, written side by side under their
    ``.partial`` names."""

    def __init__(self, prefix: Path, partial: dict[Path, Path], token_dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.partial = prefix, partial
        self.tokens = IndexedDatasetBuilder(str(partial[Path(f"{prefix}.bin")]), dtype=token_dtype.type)
        self.masks = IndexedDatasetBuilder(str(partial[Path(f"{mask_prefix(prefix)}.bin")]), dtype=np.uint8)
        self.token_dtype = token_dtype

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: list[int]) -> None:
        """One document (of one or more sequences of ``lengths``)."""
        self.tokens.add_document(ids.astype(self.token_dtype), lengths)
        self.masks.add_document(mask.astype(np.uint8), lengths)

    def __enter__(self) -> MaskedDocuments:
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is not None:  # nothing half-written stays behind
            self.tokens.data_file.close()
            self.masks.data_file.close()
            remove_partial(self.partial)
        return False

    def publish(self, summary: MaskedSummary, issues, count: int, what: str, description: Path,
                started: float, hint: str = "") -> None:
        """Finish the files and rename them into place; one error, and nothing written, when no
        record became a document (``what``: e.g. "prepare-chat: no usable conversation"; ``hint``:
        what to do about the reasons, appended to it)."""
        summary.count_rejects(issues)
        if count == 0:
            reasons = ", ".join(f"{k}={v}" for k, v in issues.counts.items()) or "no records"
            raise ConfigError(f"{what} in the inputs ({reasons}); nothing was written" + hint)
        self.masks.finalize(str(self.partial[Path(f"{mask_prefix(self.prefix)}.idx")]))
        self.tokens.finalize(str(self.partial[Path(f"{self.prefix}.idx")]))
        summary.seconds = round(time.perf_counter() - started, 3)
        publish(summary, self.prefix, self.partial, description)
