"""One trainer per run directory: an exclusive lock that a second ``megasmol train`` on the same
run meets with a clear error, before it touches the first one's checkpoints.

Rank 0 takes a ``flock`` on ``<run_dir>/.megasmol.lock`` (released by the kernel when the
process ends, however it ends) and every rank learns the verdict, so all of them stop together.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import torch

from megasmol.config.typed import ConfigError
from megasmol.errors import RunFailure

LOCK_FILE = ".megasmol.lock"


class RunLocked(RunFailure, RuntimeError):
    """Another trainer holds this run directory."""


class RunLock:
    def __init__(self, run_dir: Path, checkpoint_dir: Path):
        self.run_dir, self.checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
        self._fd = None
        self.kept_on_error = False
        """Leave the lock held when the ``with`` block raises: its owner releases it (an in-process
        restart's attempt, in NVRx's finalize hook, where no interruption arrives; NVRx's
        interruption can reach this thread at any line, e.g. right after ``os.close`` below, and
        a second close then hit a descriptor no longer ours: "Bad file descriptor")."""

    def _rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def _try_lock(self) -> str | None:
        """Rank 0's attempt; returns the reason it failed, or None."""
        if self.checkpoint_dir.exists() and not self.checkpoint_dir.is_dir():
            return f"checkpoint.dir {self.checkpoint_dir} is a file, not a directory"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            return f"run_dir {self.run_dir}: {exc.strerror}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (f"{self.run_dir} is being trained by {holder}; one trainer per run directory "
                    "(wait for it, or give this run another run_dir)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return None

    def __enter__(self) -> RunLock:
        verdict = [self._try_lock() if self._rank() == 0 else None]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            self.release()
            error = ConfigError if verdict[0].startswith("checkpoint.dir") else RunLocked
            raise error(verdict[0])
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None  # forgotten first: never closed twice
        if fd is not None:
            # Unlocked explicitly: closing releases a flock only once every copy of the descriptor
            # is closed, and a process forked from this one (Megatron-Core's checkpoint writers and
            # their results manager) holds a copy for as long as it lives; an in-process restart
            # takes the lock again in this same process.
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None or not self.kept_on_error:
            self.release()
