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
import signal
import sys
import time
from typing import Optional

import torch

from megasmol.config.run import RunConfig
from megasmol.errors import RunFailure
from megasmol.runtime.distributed import describe_collective_failure, rank_info_from_env, shutdown
from megasmol.train import local_copies
from megasmol.train.callbacks import Callback, Console
from megasmol.train.fault_notes import FaultNote, describe_fault
from megasmol.train.state import TrainResult
from megasmol.utils import faults  # noqa: F401  (reads the launcher's RANK before NVRx rewrites it)

NVRX_LOGGER = "nvidia_resiliency_ext"


class Attempt:
    """One call of the wrapped function: its store prefix, and what it holds until it ends."""

    def __init__(self, iteration: int, history: list[FaultNote], max_restarts: int,
                 config: Optional[RunConfig] = None, launch: Optional[str] = None):
        """``launch``: the id the processes agreed on for their local copies (None: none kept)."""
        self.iteration = iteration
        self.config = config
        self.launch = launch
        self.history = history
        self.max_restarts = max_restarts
        self.trainer = None
        self.lock = None
        self.raised: Optional[Exception] = None
        """The first error ``loop.train`` caught in this attempt (NVRx's own record of it,
        ``state.fn_exception``, is lost when its interruption reaches this rank while the error
        is still being handled)."""

    @property
    def store_prefix(self) -> str:
        return f"megasmol/attempt{self.iteration}"

    def open_local_copies(self, setup) -> Optional[local_copies.LocalCopies]:
        """This attempt's local copies, where ``resilience.local_checkpoint_every`` keeps them (the
        first attempt removes what an earlier launch of the run left on this node)."""
        if self.launch is None or self.config is None:
            return None
        if self.iteration == 0:
            local_copies.remove_stale(self.config, self.launch)
        return local_copies.LocalCopies(self.config, setup, self.launch)

    def hold(self, trainer, lock) -> None:
        """``loop.train`` hands over its trainer and run lock; after a fault, the first attempt's
        line is reported by a callback of the trainer that resumes."""
        self.trainer, self.lock = trainer, lock
        lock.kept_on_error = True  # released by free(), where NVRx's interruption cannot arrive
        if self.iteration > 0:
            trainer.callbacks.items.append(_RecoveryReport(self, trainer.console))

    def failed(self, exc: BaseException) -> None:
        """``loop.train`` caught ``exc``; NVRx's interruptions (``BaseException``) are not faults."""
        if self.raised is None and isinstance(exc, Exception):
            self.raised = exc

    def released(self) -> None:
        """``loop.train`` closed the trainer itself."""
        self.trainer = None

    def free(self) -> None:
        """After a fault: close what a failed attempt left open, never waiting on a peer."""
        trainer, self.trainer = self.trainer, None
        if trainer is not None:
            try:
                if self.raised is not None:
                    trainer.callbacks.on_error(self.raised)
                trainer.close(peers_lost=True)
            except Exception as exc:  # a half-closed trainer: the rest goes with the process
                logging.getLogger(__name__).debug("closing the failed attempt's trainer: %r", exc)
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()


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
        source = getattr(self.attempt.trainer, "resumed_source", "")
        self.line = (f"in-process restart {self.attempt.iteration} of at most "
                     f"{self.attempt.max_restarts}: {describe_fault(notes)}; resumed from step {step}"
                     + (f" ({source})" if source else ""))

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
        """NVRx's monitor thread, on a fault, while the main thread may be inside a collective:
        with NCCL, tear the groups down, which aborts it. A gloo collective cannot be aborted (its
        ``abort()`` in torch 2.13 neither closes the connections nor wakes the call), and
        destroying torch's group registry from this thread while the main thread reads it is a
        race, so on CPU the groups are left to :class:`_FreeAttempt`, on the main thread."""

        def __call__(self, state):
            if torch.cuda.is_available():
                shutdown(peers_reachable=False)
            return state

    class _FreeAttempt(inprocess.finalize.Finalize):
        """The main thread, after the interruption: note the fault, free the failed attempt."""

        def __call__(self, state):
            interruption = sys.exc_info()[1]  # NVRx calls this while handling RankShouldRestart
            exc = state.fn_exception or (run.attempt.raised if run.attempt is not None else None)
            raised = "" if exc is None else f"({type(exc).__name__}: {_first_line(exc)})"
            peer = (isinstance(exc, RuntimeError) and not isinstance(exc, RunFailure)
                    and describe_collective_failure(exc) is not None)
            run.history.append(FaultNote(state.rank, time.time(), raised, str(interruption or ""), peer))
            if run.attempt is not None:
                run.attempt.free()
            shutdown(peers_reachable=False)
            gc.collect()
            return state

    class _NoteLost(inprocess.rank_assignment.RankAssignment):
        """Before the ranks are reassigned after a fault: every interruption NVRx recorded (the
        first note has only those known when it was raised) and the ranks it lost."""

        def __call__(self, ctx):
            if run.history and ctx.state.iteration == len(run.history) - 1:
                records = ctx.store.get_interruption_records()
                if records:
                    run.history[-1].nvrx = inprocess.attribution.format_interruption_records(records)
                run.history[-1].lost = sorted(ctx.terminated_ranks)
            return ctx

    class _Continue(inprocess.initialize.Initialize):
        """Before each attempt: end the job when no restart is left, or when a lost rank leaves
        fewer ranks than training needs (no spare took its place)."""

        def __call__(self, state):
            if state.iteration > run.max_restarts:
                run.end = (f"no restart left (resilience.max_restarts={run.max_restarts}) after: "
                           f"{_last_fault(run)}")
            elif state.active_world_size < run.world_size:
                run.end = (f"{_last_fault(run)}; no spare rank takes its place (resilience.spare_ranks="
                           f"{run.config.resilience.spare_ranks}): the job ends; run it again to resume "
                           "from the latest checkpoint")
            if run.end is not None:
                raise inprocess.exception.RestartAbort(run.end)
            return state

    ranks = inprocess.compose.Compose(inprocess.rank_assignment.MaxActiveWorldSize(run.world_size),
                                      inprocess.rank_assignment.ShiftRanks(), _NoteLost())
    return _AbortGroups(), _FreeAttempt(), ranks, _Continue()


def _last_fault(run: "_Run") -> str:
    return describe_fault(run.history[-1:]) if run.history else "a rank failed"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0][:200] if lines else repr(exc)[:200]


class _Run:
    """The state of one ``train_in_process`` call across its attempts."""

    def __init__(self, config: RunConfig, launched: int):
        self.config = config
        self.max_restarts = config.resilience.max_restarts
        self.world_size = config.resilience.training_world_size(launched)
        """The ranks that train; the other processes launched are spares."""
        self.history: list[FaultNote] = []
        self.attempt: Optional[Attempt] = None
        self.end: Optional[str] = None
        """Why no attempt follows (``_Continue``)."""
        self.store = None
        """NVRx's store (its ``CallWrapper``'s), for what a launcher's SIGTERM should say."""
        self.launch: Optional[str] = None
        """The id of this launch's local copies (``resilience.local_checkpoint_every``)."""


def _stopped_by_launcher(inprocess, run: _Run) -> Optional[str]:
    """What to say when the launcher ends this rank during a restart (torchrun ends every worker
    once one exits): the fault with every record NVRx has of it, the lost ranks included (a killed
    rank's monitor records it within a second: wait that long for it)."""
    if not run.history or run.store is None:
        return None
    note = run.history[-1]
    try:
        store = inprocess.store.PrefixStore(len(run.history) - 1, run.store)
        deadline = time.monotonic() + 3.0
        while not store.get_terminated_ranks() and time.monotonic() < deadline:
            time.sleep(0.2)
        note.lost = sorted(store.get_terminated_ranks())
        records = store.get_interruption_records()
        if records:
            note.nvrx = inprocess.attribution.format_interruption_records(records)
    except Exception:  # the store's host is gone: say what this rank knows
        pass
    return (f"{describe_fault([note])}; the launcher stopped this rank (SIGTERM) before it could "
            "restart: torchrun ends every worker when one exits (a spare rank needs a launcher that "
            "keeps the others, docs/pretraining.md)")


def _on_launcher_stop(inprocess, run: _Run):
    """SIGTERM while NVRx restarts (the trainer's own handler covers the attempts): one line naming
    the fault, then the end the signal asks for; before any fault, SIGTERM's default."""
    def handle(signum, frame):
        line = _stopped_by_launcher(inprocess, run)
        if line is None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        print(f"megasmol train: error: in-process restart: {line}", file=sys.stderr, flush=True)
        os._exit(RunFailure.exit_code)
    return handle


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def train_in_process(config: RunConfig) -> TrainResult:
    """``loop.train`` under NVRx's ``inprocess.Wrapper`` with ``config.resilience``'s timeouts."""
    from megasmol.train.loop import train

    inprocess = _nvrx()
    resilience = config.resilience
    logging.getLogger(NVRX_LOGGER).setLevel(logging.CRITICAL)  # megasmol says one line per fault
    run = _Run(config, rank_info_from_env().world_size)
    abort, finalize, rank_assignment, initialize = _hooks(inprocess, run)
    port = resilience.store_port or int(os.environ.get("MASTER_PORT", "29500")) + 1
    health = inprocess.health_check.CudaHealthCheck() if torch.cuda.is_available() else None
    wrapper = inprocess.Wrapper(
        store_kwargs={"port": port, "timeout": _seconds(resilience.barrier_timeout_s)},
        initialize=initialize,
        rank_assignment=rank_assignment,
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
        run.store = call_wrapper.base_store
        if resilience.local_checkpoint_every and run.launch is None:
            run.launch = local_copies.agree_launch(run.store)
        run.attempt = Attempt(call_wrapper.iteration, run.history, resilience.max_restarts,
                              run.config, run.launch)
        return train(run.config, run.attempt)

    previous = signal.signal(signal.SIGTERM, _on_launcher_stop(inprocess, run))
    try:
        return wrapper(attempt)()
    except inprocess.exception.RestartAbort as exc:
        raise RunFailure(f"in-process restart: {run.end or exc}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if run.launch is not None:
            local_copies.remove(config, run.launch)
