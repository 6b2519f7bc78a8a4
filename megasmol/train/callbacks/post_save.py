"""``checkpoint.post_save_command`` on each committed checkpoint (rank 0, in the background):
one command at a time, its output in the run directory, a bounded wait at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megasmol.train.callbacks.base import Callback

POST_SAVE_GRACE_S = 30.0
"""After a stop signal, how long a running post-save command may still take before it is stopped
(the checkpoint itself is already saved; Slurm's --signal=USR1@300 leaves minutes in all)."""


class PostSaveCallback(Callback):
    priority = 70
    name = "post_save"

    def __init__(self, runner):
        """``runner``: rank 0's ``ckpt.post_save.PostSaveRunner``; None on the other ranks."""
        self.runner = runner

    def on_checkpoint_committed(self, path: Path, step: int) -> None:
        if self.runner is not None:
            self.runner.submit(path, step)

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        if self.runner is not None:  # after a stop signal, the preemption grace is short
            grace: Optional[float] = POST_SAVE_GRACE_S if stopped_by_signal else None
            self.runner.close(grace)
