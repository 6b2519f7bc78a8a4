"""The hooks the training loop calls, and the ordered list of components it calls them on.

Everything that runs inside the loop besides the step and its policy (LR, skips, the step guard,
rollback, stop agreement, saving) is a ``Callback``: logging to the console and the metric sinks,
the progress bar, the throughput watch, the hang watchdog, NVRx heartbeats, validation, downstream
evaluation and post-save commands. Callbacks observe; they never change what the model trains on.

Hooks, in the order a run meets them (every rank calls each hook unless said otherwise; a hook
marked collective may call collectives, so every rank holds the same callbacks in the same order,
the order of ``build_callbacks``' list):

* ``on_train_start(step)``: the loop is about to train the steps after ``step`` (at the start,
  and again after a rollback);
* ``on_step_start(step)`` and ``on_step_end(step)``: right before and after each step, trained or
  skipped (cheap and local: the hang watchdog times the step between them);
* ``on_log(record, steps)``: a logging interval ended: ``record`` is its ``train`` record
  (loss, tokens/s, ...), ``steps`` how many steps it covers; collective;
* ``on_step_done(step)``: after the step's log line, before its checkpoint: the work due at this
  step (validation, downstream evaluation); collective;
* ``on_checkpoint(step, reason)``: a checkpoint of ``step`` is about to be written (``reason``:
  ``interval``, ``end`` or ``signal``); collective;
* ``on_checkpoint_committed(path, step)``: rank 0 only, once the checkpoint's files are complete
  (with async saves, later); never collective;
* ``on_rollback(step)``: the step guard asked for a rollback at ``step``;
* ``on_error(exc)``: the run is failing with ``exc`` (before ``close``);
* ``close(stopped_by_signal, peers_lost)``: always, once, in reverse order; with ``peers_lost``
  a callback must not wait on other ranks.

Callbacks keep no state across a restart: what a resumed run needs is the loop's (the train
state, the step guard's window), saved with the checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megasmol.utils.fs import shown_paths

if TYPE_CHECKING:
    from megasmol.train.metrics import MetricsLog
    from megasmol.train.setup import TrainingSetup
    from megasmol.train.state import TrainState

log = logging.getLogger(__name__)


class Console:
    """Lines for a person, printed by the logging rank only (through the progress bar when one
    is shown)."""

    def __init__(self, active: bool):
        self.active = active
        self.progress = None

    def print(self, text: str) -> None:
        if not self.active:
            return
        text = shown_paths(text)  # paths relative to the current directory, as typed
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)


@dataclass
class LoopContext:
    """What callbacks may read about the run (never the model's training inputs)."""

    setup: TrainingSetup
    """The ``TrainingSetup`` (model, layout, data plan); callbacks use it for forward-only work."""
    run_dir: Path
    total_steps: int
    metrics: MetricsLog
    """The ``MetricsLog``: rank 0's metric sinks (JSONL and trackers); inert on other ranks."""
    console: Console
    state: TrainState
    """The loop's ``TrainState`` (read it; the loop owns it): ``consumed_tokens`` for records."""

    def emit(self, kind: str, record: dict, line: Optional[str] = None) -> None:
        """Write ``record`` to the metric sinks as ``kind`` and print ``line``."""
        self.metrics.write(record, kind=kind)
        if line is not None:
            self.console.print(line)


class Callback:
    name: str = "callback"
    """Unique among the run's callbacks (``Callbacks[name]``)."""

    def on_train_start(self, step: int) -> None:
        pass

    def on_step_start(self, step: int) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        pass

    def on_log(self, record: dict, steps: int) -> None:
        pass

    def on_step_done(self, step: int) -> None:
        pass

    def on_checkpoint(self, step: int, reason: str) -> None:
        pass

    def on_checkpoint_committed(self, path: Path, step: int) -> None:
        pass

    def on_rollback(self, step: int) -> None:
        pass

    def on_error(self, exc: BaseException) -> None:
        pass

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        pass


class Callbacks:
    """The callbacks in the order given; calling a hook here calls it on each of them in that
    order (``close``: in reverse)."""

    def __init__(self, callbacks: list[Callback]):
        self.items = list(callbacks)
        names = [c.name for c in self.items]
        if len(set(names)) != len(names):
            raise ValueError(f"two callbacks share a name: {names}")

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, name: str) -> Callback:
        for callback in self.items:
            if callback.name == name:
                return callback
        raise KeyError(name)

    def on_train_start(self, step: int) -> None:
        for c in self.items:
            c.on_train_start(step)

    def on_step_start(self, step: int) -> None:
        for c in self.items:
            c.on_step_start(step)

    def on_step_end(self, step: int) -> None:
        for c in self.items:
            c.on_step_end(step)

    def on_log(self, record: dict, steps: int) -> None:
        for c in self.items:
            c.on_log(record, steps)

    def on_step_done(self, step: int) -> None:
        for c in self.items:
            c.on_step_done(step)

    def on_checkpoint(self, step: int, reason: str) -> None:
        for c in self.items:
            c.on_checkpoint(step, reason)

    def on_checkpoint_committed(self, path: Path, step: int) -> None:
        for c in self.items:
            c.on_checkpoint_committed(path, step)

    def on_rollback(self, step: int) -> None:
        for c in self.items:
            c.on_rollback(step)

    def on_error(self, exc: BaseException) -> None:
        for c in self.items:
            try:
                c.on_error(exc)
            except Exception:  # the original error is the one to report
                log.exception("callback %s failed in on_error", c.name)

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        """Every callback, in reverse order (the metric sinks, opened first, close last); the
        first failure is raised once all are closed."""
        failure = None
        for c in reversed(self.items):
            try:
                c.close(stopped_by_signal=stopped_by_signal, peers_lost=peers_lost)
            except Exception as exc:  # noqa: PERF203 - close the rest before raising
                failure = failure or exc
        if failure is not None:
            raise failure
