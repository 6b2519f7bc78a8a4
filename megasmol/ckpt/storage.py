"""Where a dist checkpoint's items lie in its files, read from PyTorch DCP's ``.metadata`` without
loading a tensor: for what needs the bytes themselves (the reference log-probs' key hashes the
weights) or the files' expected sizes (a failed load names the file that ends early)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

from megasmol.ckpt.checkpoint import CheckpointError, describe_error, load_errors


class StoredItem(NamedTuple):
    fqn: str
    file: str
    """Relative to the iteration directory (``__0_0.distcp``)."""
    offset: int
    length: int


def stored_items(iteration: Path) -> list[StoredItem]:
    """Every item of ``iteration``, in file then offset order."""
    from torch.distributed.checkpoint import FileSystemReader

    from megasmol.ckpt import trust

    trust.install()  # .metadata is a pickle: read it through the restricted unpickler
    try:
        storage = FileSystemReader(str(iteration)).read_metadata().storage_data
    except load_errors() as exc:
        raise CheckpointError(f"{iteration}/.metadata: unreadable checkpoint metadata: "
                              f"{describe_error(exc)}") from None
    items = [StoredItem(index.fqn, info.relative_path, info.offset, info.length)
             for index, info in storage.items()]
    return sorted(items, key=lambda item: (item.file, item.offset, item.fqn))


def short_file(iteration: Path) -> Optional[str]:
    """The name of the first file of ``iteration`` shorter than ``.metadata`` says it is (or a
    ``common.pt`` that is no whole zip archive): a truncated copy. None when every file is whole
    (or ``.metadata`` itself is unreadable)."""
    try:
        items = stored_items(iteration)
    except CheckpointError:
        return None
    needed: dict[str, int] = {}
    for item in items:
        needed[item.file] = max(needed.get(item.file, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        path = iteration / name
        if not path.is_file() or path.stat().st_size < size:
            return name
    common = iteration / "common.pt"
    if common.is_file() and not zipfile.is_zipfile(common):
        return common.name
    return None
