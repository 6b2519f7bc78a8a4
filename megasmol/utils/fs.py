"""Writing files so that no reader ever sees half of one: write under a temporary name, sync,
rename into place (and sync the directory, so the rename survives a crash). Every room uses these."""

from __future__ import annotations

import os
import re
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` under a temporary name and rename it into place once complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: str | os.PathLike, array, save=None) -> None:
    """``numpy.save`` under a temporary name, synced and renamed: a reader (another rank, a later
    start) sees no file or the whole array, never a short one. ``save`` is the writer to call."""
    import numpy as np

    path = os.fspath(path)
    path = path if path.endswith(".npy") else path + ".npy"
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            (save or np.save)(fh, array)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def shown(path: str | os.PathLike) -> str:
    """``path`` as a console line shows it: relative to the current directory when beneath it
    (as the user typed it), else as it is."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def shown_paths(text: str) -> str:
    """``text`` with every absolute path beneath the current directory written relative to it,
    as :func:`shown` writes one path: for lines built deep in the code (errors, log records, the
    pre-flight table) on their way to the console. The directory itself becomes ``.``; a path
    elsewhere, or a longer name that merely starts like the directory, stays as it is."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under us
        return text
    if cwd == os.sep or cwd not in text:
        return text
    pattern = re.compile(r"(?<![\w.~/-])" + re.escape(cwd) + r"(?:(/)(?=[^\s/'\"])|(?![\w.~/-]))")
    return pattern.sub(lambda m: "" if m.group(1) else ".", text)


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` (made absolute) or its nearest parent that exists: where an output that is not
    there yet would be created, to check before any work (a file there means no folder can be)."""
    absolute = Path(path).absolute()
    return next(p for p in (absolute, *absolute.parents) if p.exists())
