"""In-process restart (``resilience.in_process_restart``): ``megasmol train`` inside NVIDIA Resiliency
Extension's ``inprocess.Wrapper``.

Every rank calls :func:`train_in_process`, which runs ``loop.train`` as NVRx's wrapped function.
When a rank raises, or its main thread stops running Python for ``resilience.soft_timeout_s``
(stuck in a collective or a call), NVRx interrupts every rank; here the process groups are torn
down (:class:`_AbortGroups`), what the failed attempt held is freed (:class:`_FreeAttempt`: the
trainer's callbacks, threads and data loader, the run lock, Megatron's parallel state), and
``loop.train`` runs again in the same processes: it rebuilds the groups under a new store prefix
and resumes from the latest checkpoint, as a restarted job would. The logging rank prints one line
per fault once the first step after it is done (:class:`_RecoveryReport`).

What gloo cannot do: abort a collective in flight. A rank that waits in a gloo collective for a
frozen peer is freed by ``training.collective_timeout_s`` (hence it must be below the soft
timeout), and a rank frozen outside Python is ended by NVRx's hard timeout (docs/training-loop.md).

No ``from __future__ import annotations`` here: NVRx finds the ``CallWrapper`` parameter of the
wrapped function by its annotation object.
"""

import datetime
import gc
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megasmol.config.run import RunConfig
from megasmol.errors import RunFailure
from megasmol.runtime.distributed import shutdown
from megasmol.train.callbacks import Callback, Console
from megasmol.train.state import TrainResult

NVRX_LOGGER = "nvidia_resiliency_ext"


@dataclass
class FaultNote:
    """What one rank saw of a fault, kept across attempts and gathered by the next one."""

    at: float
    """``time.time()`` when this rank's clean-up began (the fault was noticed)."""
    raised: str
    """This rank's own exception, one line ("" when it was interrupted without one)."""
    nvrx: str
    """NVRx's attribution: which ranks caused the restart and how (``Interruption.EXCEPTION on
    ranks={1}``)."""


class Attempt:
    """One call of the wrapped function: its store prefix, and what it holds until it ends."""

    def __init__(self, iteration: int, history: list[FaultNote], max_restarts: int):
        self.iteration = iteration
        self.history = history
        self.max_restarts = max_restarts
        self.trainer = None
        self.lock = None

    @property
    def store_prefix(self) -> str:
        return f"megasmol/attempt{self.iteration}"

    def hold(self, trainer, lock) -> None:
        """``loop.train`` hands over its trainer and run lock; after a fault, the first attempt's
        line is reported by a callback of the trainer that resumes."""
        self.trainer, self.lock = trainer, lock
        if self.iteration > 0:
            trainer.callbacks.items.append(_RecoveryReport(self, trainer.console))

    def released(self) -> None:
        """``loop.train`` closed the trainer itself."""
        self.trainer = None

    def free(self) -> None:
        """After a fault: close what a failed attempt left open, never waiting on a peer."""
        trainer, self.trainer = self.trainer, None
        if trainer is not None:
            try:
                trainer.close(peers_lost=True)
            except Exception as exc:  # a half-closed trainer: the rest goes with the process
                logging.getLogger(__name__).debug("closing the failed attempt's trainer: %r", exc)
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()


_KINDS = {
    "EXCEPTION": "raised",
    "BASE_EXCEPTION": "was interrupted",
    "SOFT_TIMEOUT": "made no progress for resilience.soft_timeout_s",
    "HARD_TIMEOUT": "was terminated after resilience.hard_timeout_s",
    "TERMINATED": "was terminated",
    "UNRESPONSIVE": "stopped answering (no heartbeat for resilience.heartbeat_timeout_s)",
    "MONITOR_PROCESS_EXCEPTION": "lost its NVRx monitor process",
}


def describe_fault(notes: list[FaultNote]) -> str:
    """The fault in words, from every rank's note: NVRx names the ranks and how; a rank that
    raised says what."""
    nvrx = next((n.nvrx for n in notes if n.nvrx), "")
    parts = []
    for kind, ranks in re.findall(r"Interruption\.(\w+) on ranks=\{([\d, ]*)\}", nvrx):
        for rank in sorted(int(r) for r in ranks.split(",") if r.strip()):
            what = f"rank {rank} {_KINDS.get(kind, kind.lower())}"
            if kind == "EXCEPTION" and rank < len(notes) and notes[rank].raised:
                what += f" {notes[rank].raised}"
            parts.append(what)
    return "; ".join(parts) or nvrx or "a rank failed"


class _RecoveryReport(Callback):
    """The console line of a fault: gathered when the resumed attempt starts (every rank, the same
    hook), printed when its first step is done."""

    name = "in_process_restart"

    def __init__(self, attempt: Attempt, console: Console):
        self.attempt, self.console = attempt, console
        self.line: Optional[str] = None
        self.fault_at: Optional[float] = None

    def on_train_start(self, step: int) -> None:
        if self.line is not None:  # after a rollback: said already
            return
        notes: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(notes, self.attempt.history[-1])
        self.fault_at = min(n.at for n in notes)
        self.line = (f"in-process restart {self.attempt.iteration} of at most "
                     f"{self.attempt.max_restarts}: {describe_fault(notes)}; resumed from step {step}")

    def on_step_done(self, step: int) -> None:
        if self.fault_at is None:
            return
        self.console.print(f"{self.line}; step {step} done {time.time() - self.fault_at:.1f} s after "
                           "the fault")
        self.fault_at = None


def _nvrx():
    try:
        from nvidia_resiliency_ext import inprocess
    except ImportError:
        raise RunFailure("resilience.in_process_restart needs nvidia-resiliency-ext "
                         "(pip install 'megasmol[nvrx]')") from None
    return inprocess


def _hooks(inprocess, run: "_Run"):
    class _AbortGroups(inprocess.abort.Abort):
        """NVRx's monitor thread, on a fault: tear down Megatron's and torch's groups, which makes a
        peer's gloo collective with this rank fail instead of waiting."""

        def __call__(self, state):
            shutdown(peers_reachable=False)
            return state

    class _FreeAttempt(inprocess.finalize.Finalize):
        """The main thread, after the interruption: note the fault, free the failed attempt."""

        def __call__(self, state):
            interruption = sys.exc_info()[1]  # NVRx calls this while handling RankShouldRestart
            exc = state.fn_exception
            raised = "" if exc is None else f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            run.history.append(FaultNote(time.time(), raised, str(interruption or "")))
            if run.attempt is not None:
                run.attempt.free()
            shutdown(peers_reachable=False)
            gc.collect()
            return state

    return _AbortGroups(), _FreeAttempt()


class _Run:
    """The state of one ``train_in_process`` call across its attempts."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.history: list[FaultNote] = []
        self.attempt: Optional[Attempt] = None


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def train_in_process(config: RunConfig) -> TrainResult:
    """``loop.train`` under NVRx's ``inprocess.Wrapper`` with ``config.resilience``'s timeouts."""
    from megasmol.train.loop import train

    inprocess = _nvrx()
    resilience = config.resilience
    logging.getLogger(NVRX_LOGGER).setLevel(logging.CRITICAL)  # megasmol says one line per fault
    run = _Run(config)
    abort, finalize = _hooks(inprocess, run)
    port = resilience.store_port or int(os.environ.get("MASTER_PORT", "29500")) + 1
    health = inprocess.health_check.CudaHealthCheck() if torch.cuda.is_available() else None
    wrapper = inprocess.Wrapper(
        store_kwargs={"port": port, "timeout": _seconds(resilience.barrier_timeout_s)},
        initialize=inprocess.initialize.RetryController(max_iterations=resilience.max_restarts + 1),
        abort=abort,
        finalize=finalize,
        health_check=health,
        soft_timeout=_seconds(resilience.soft_timeout_s),
        hard_timeout=_seconds(resilience.hard_timeout_s),
        heartbeat_interval=_seconds(resilience.heartbeat_interval_s),
        heartbeat_timeout=_seconds(resilience.heartbeat_timeout_s),
        barrier_timeout=_seconds(resilience.barrier_timeout_s),
        completion_timeout=_seconds(resilience.barrier_timeout_s),
    )

    # NVRx passes its CallWrapper to the parameter annotated with that type (keep the annotation).
    def attempt(call_wrapper: Optional[inprocess.CallWrapper] = None) -> TrainResult:  # type: ignore[name-defined]
        assert call_wrapper is not None, "inprocess.Wrapper passes its CallWrapper"
        run.attempt = Attempt(call_wrapper.iteration, run.history, resilience.max_restarts)
        return train(run.config, run.attempt)

    try:
        return wrapper(attempt)()
    except inprocess.exception.RestartAbort as exc:
        last = (run.history[-1].nvrx or run.history[-1].raised) if run.history else str(exc)
        raise RunFailure(f"in-process restart: no restart left (resilience.max_restarts="
                         f"{resilience.max_restarts}) after: {last}") from None
