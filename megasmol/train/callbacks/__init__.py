"""What the training loop calls at its hooks (see ``base``): one small file per component, and
``build_callbacks``, the one place that decides which run and in what order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from megasmol.train.callbacks.base import Callback, Callbacks, Console, LoopContext

__all__ = ["Callback", "Callbacks", "Console", "LoopContext", "build_callbacks"]


def build_callbacks(ctx: LoopContext, config, *, tokenizer_dir,
                    prune_uploaded: Optional[Callable] = None,
                    signalled_at: Optional[Callable[[], Optional[float]]] = None) -> Callbacks:
    """The run's callbacks, the same list in the same order on every rank (hooks may be
    collective). Its order is the one place callback order is declared: each hook runs down the
    list, ``close`` up it. ``prune_uploaded``: with ``checkpoint.delete_after_upload``, what to
    call once a post-save command succeeded. ``signalled_at``: when the stop signal came
    (``time.monotonic()``; None before one), where the post-save grace counts from."""
    from megasmol.train.callbacks.downstream import DownstreamCallback
    from megasmol.train.callbacks.hang import HangWatchdog
    from megasmol.train.callbacks.heartbeats import NvrxHeartbeats
    from megasmol.train.callbacks.metrics import MetricsCallback
    from megasmol.train.callbacks.post_save import PostSaveCallback, PostSaveRunner
    from megasmol.train.callbacks.progress import ProgressCallback
    from megasmol.train.callbacks.throughput import ThroughputCallback
    from megasmol.train.callbacks.validation import ValidationCallback
    from megasmol.train.metrics import NvmlSampler

    setup, logging_config, ckpt = ctx.setup, config.logging, config.checkpoint
    watched = logging_config.nvml and logging_config.expected_tokens_per_s_per_gpu
    callbacks: list[Callback] = [
        # First to see a record, last to close: the others write through its sinks.
        MetricsCallback(ctx),
        # Next, so the lines later callbacks print go through the bar; it closes before the sinks.
        ProgressCallback(ctx, logging_config.progress),
        ThroughputCallback(ctx, logging_config, NvmlSampler() if watched else None),  # its own GPU
        HangWatchdog(config.watchdog, ctx.run_dir, setup.rank.rank),
        NvrxHeartbeats(config.watchdog.nvrx_heartbeats),
        # The work due at a step: the validation loss before downstream scores.
        ValidationCallback(ctx, config.eval.interval, config.eval.steps),
    ]
    if config.eval.scores_tasks:  # eval.tasks_at_checkpoint=false alone turns it off
        from megasmol.eval.in_loop import InLoopEvaluation

        callbacks.append(DownstreamCallback(ctx, InLoopEvaluation(config, setup.spec, tokenizer_dir)))
    runner = None
    if ckpt.post_save_command and setup.is_logging_rank:
        runner = PostSaveRunner(ckpt.post_save_command, ckpt.post_save_timeout_s,
                                on_success=prune_uploaded if ckpt.delete_after_upload else None)
    # Last: first to close, so the end waits for the queued commands before anything else closes.
    callbacks.append(PostSaveCallback(runner, ckpt.signal_grace_s, signalled_at))
    return Callbacks(callbacks)
