"""The run's checkpoints: when to save, writing (sync or async), the already-latest rule,
recovery of interrupted saves, pruning, and reading one back for a resume or a rollback.

Two hooks reach the callbacks: ``on_checkpoint`` on every rank before a checkpoint is written
(collective work such as downstream evaluation may run there), and ``on_checkpoint_committed``
on rank 0 once its files are complete (with async saves, when the background write finished).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from megasmol.ckpt import train_state
from megasmol.ckpt.checkpoint import (
    describe_error,
    disk_full,
    iteration_dirname,
    latest_iteration,
    load_errors,
    recover_interrupted_saves,
)
from megasmol.errors import RunFailure
from megasmol.runtime.distributed import describe_collective_failure
from megasmol.utils.fs import shown

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.train.callbacks import Callbacks, Console
    from megasmol.train.setup import TrainingSetup
    from megasmol.utils.faults import FaultPlan


class SaveFailed(RunFailure, RuntimeError):
    """A checkpoint could not be written (the previous ``latest`` stays as it was)."""


@contextlib.contextmanager
def _save_errors(root: Path, step: Optional[int]):
    """DCP reports a failed write as a ``CheckpointException`` (a BaseException) holding every
    rank's traceback: one line instead, naming the directory and the first cause."""
    try:
        yield
    except load_errors() as exc:
        if isinstance(exc, (SaveFailed, RuntimeError)) and describe_collective_failure(exc):
            raise
        where = f"step {step} to {root}" if step is not None else f"a checkpoint to {root}"
        cause = describe_error(exc)
        full = disk_full(root, cause)
        if full:
            cause = f"{full} ({cause})"
        raise SaveFailed(f"saving {where} failed: {cause}; the previous checkpoint stays the "
                         "latest") from None


class Checkpointer:
    def __init__(self, config: RunConfig, setup: TrainingSetup, console: Console,
                 tokenizer_dir: Optional[Path], faults: Optional[FaultPlan] = None):
        """``faults``: a test's ``utils.faults.FaultPlan`` for the save seams (default: the
        setup's, ``NO_FAULTS`` in production)."""
        self.config, self.setup, self.console = config.checkpoint, setup, console
        self.faults = faults or setup.faults
        self.root: Path = config.checkpoint_dir
        self.tokenizer_dir = tokenizer_dir
        self.hooks: Optional[Callbacks] = None
        """The run's ``Callbacks`` (set once they are built)."""
        self.uploads = None
        """Rank 0's uploads to the bucket of an ``s3://`` ``checkpoint.dir`` (``train/bucket.py``)."""
        if config.checkpoint_url is not None and setup.is_logging_rank:
            from megasmol.train.bucket import BucketUploads

            self.uploads = BucketUploads(config.checkpoint_url, self.config.keep_last, self.faults)
        self.async_queue = None
        if self.config.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def recover(self) -> None:
        """Collective: rank 0 finishes or discards saves a killed run left half-renamed."""
        if self.setup.is_logging_rank and self.root.is_dir():
            for action in recover_interrupted_saves(self.root):
                self.console.print(f"checkpoints: {action}")
        torch.distributed.barrier()

    def latest(self) -> Optional[Path]:
        return latest_iteration(self.root)

    def due(self, step: int) -> bool:
        return bool(self.config.interval and step % self.config.interval == 0)

    def save(self, step: int, metadata: Callable[[], dict], reason: str) -> Path:
        """Collective: write the checkpoint of ``step`` (``reason``: interval, end or signal); with
        async saving, return once it is scheduled. ``metadata()`` gives ``megasmol.json``.

        A step that already has the latest complete checkpoint (a rerun of a finished run or
        stage) is not written again: the complete copy is never touched."""
        self.finish()  # one save in flight at a time
        latest = latest_iteration(self.root)
        if latest is not None and latest.name == iteration_dirname(step):
            return latest
        if self.hooks is not None:
            self.hooks.on_checkpoint(step, reason)
        started = time.perf_counter()

        with _save_errors(self.root, step):
            return train_state.save_training_checkpoint(
                self.setup.model, self.setup.optimizer, self.root, step, metadata(),
                tokenizer_source=self.tokenizer_dir, async_queue=self.async_queue,
                on_commit=lambda path: self.committed(path, step, started), faults=self.faults)

    def committed(self, path: Path, step: int, started: float) -> None:
        """Rank 0, once checkpoint ``path`` of ``step`` is complete (a save began at ``started``,
        ``time.perf_counter()``): the hooks, its line, its upload to the bucket (never waited
        for), and pruning (after the upload's submission, so a queued upload it replaced is
        pruned as any older copy; the copies uploading or queued stay)."""
        if self.hooks is not None:
            self.hooks.on_checkpoint_committed(path, step)
        self.console.print(f"saved checkpoint {shown(path)} ({time.perf_counter() - started:.1f}s)")
        if self.uploads is not None:
            self.uploads.submit(path, step)
        self.prune(self.config.keep_last)

    def prune(self, keep_last: int) -> None:
        """Rank 0: keep the newest ``keep_last`` local checkpoints (and the ones uploading or
        queued for upload to the bucket)."""
        pinned = self.uploads.pinned() if self.uploads is not None else set()
        train_state.prune_checkpoints(self.root, keep_last, keep=pinned)

    def poll(self) -> None:
        """Collect a finished background save (its failure is raised here)."""
        if self.async_queue is not None:
            with _save_errors(self.root, None):
                self.async_queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Wait for the save in flight."""
        if self.async_queue is not None:
            with _save_errors(self.root, None):
                self.async_queue.maybe_finalize_async_calls(blocking=True)

    def restore(self, path: Path) -> dict:
        """Load model and optimizer state from ``path``; returns its ``megasmol.json``."""
        return train_state.load_training_checkpoint(self.setup.model, self.setup.optimizer, path)

    def prune_uploaded(self, path: Path) -> None:
        """Once a checkpoint is uploaded (``delete_after_upload``), only the newest stays local."""
        self.prune(keep_last=1)

    def close(self, peers_lost: bool = False) -> None:
        """Wait for pending saves; with ``peers_lost``, not (their commit is a collective that
        would only time out again)."""
        if self.async_queue is not None and not peers_lost:
            self.async_queue.close()
        if self.uploads is not None:
            if sys.exc_info()[0] is None:
                self.uploads.close()  # the newest checkpoint not in the bucket: the run failed
                self.prune(self.config.keep_last)  # the copies kept for their uploads
            else:
                self.uploads.wait()  # closing after an error: that error is the one to report
