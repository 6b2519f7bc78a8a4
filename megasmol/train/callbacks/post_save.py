"""``checkpoint.post_save_command`` on each committed checkpoint (rank 0, in the background):
one command at a time, its output in the run directory, a bounded wait at the end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from megasmol.train.callbacks.base import Callback


class PostSaveCallback(Callback):
    priority = 70
    name = "post_save"

    def __init__(self, runner, grace_s: float,
                 signalled_at: Optional[Callable[[], Optional[float]]] = None):
        """``runner``: rank 0's ``ckpt.post_save.PostSaveRunner``; None on the other ranks.
        ``grace_s``: ``checkpoint.signal_grace_s``, counted from ``signalled_at()`` (the
        ``time.monotonic()`` of the stop signal; now when it gives None)."""
        self.runner, self.grace_s, self.signalled_at = runner, grace_s, signalled_at

    def on_checkpoint_committed(self, path: Path, step: int) -> None:
        if self.runner is not None:
            self.runner.submit(path, step)

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        if self.runner is None:
            return
        if not stopped_by_signal:
            self.runner.close()
            return
        # Preempted: the save after the signal and the post-save command share the grace the
        # scheduler gives from its signal (Slurm's KillWait) before it kills the job.
        since = self.signalled_at() if self.signalled_at is not None else None
        since = time.monotonic() if since is None else since
        self.runner.close(since + self.grace_s - time.monotonic())
