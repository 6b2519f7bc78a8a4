"""``megasmol train``: the step loop over a staged data plan.

The loop resumes or branches, then per step: the LR from the schedule and the one training step
(``step.train_step``: forward/backward, one all-reduce for the loss and the flags every rank must
agree on, the step guard's decision, the optimizer); then the callbacks' hooks (logging,
watchdogs, validation, downstream evaluation: ``callbacks/``) and the checkpoint policy
(``checkpointing.Checkpointer``). Steps in ``spikes.skip_batches`` (or skipped by a rollback) run
nothing but still advance the step counter and the schedule, so the data of every other step never
moves. Policy (LR, skips, rollback, stop agreement, saving) lives here and in the step, never in a
callback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megasmol.ckpt.checkpoint import read_metadata
from megasmol.config.run import RunConfig
from megasmol.data.run_tokenizer import run_tokenizer_dir
from megasmol.errors import RunFailure
from megasmol.runtime.distributed import PeerLost, describe_collective_failure, init_distributed
from megasmol.runtime.run_dir import Kind, RunDir
from megasmol.runtime.run_lock import RunLock
from megasmol.train.bucket import prepare as prepare_bucket
from megasmol.train.callbacks import Console, LoopContext, build_callbacks
from megasmol.train.checkpointing import Checkpointer, SaveFailed
from megasmol.train.guard import StepGuard, TrainingDiverged
from megasmol.train.metrics import IntervalStats, open_metrics
from megasmol.train.resume import branch, checkpoint_metadata, resume, train_state_from
from megasmol.train.schedules import lr_at
from megasmol.train.setup import TrainingSetup, build_setup, run_directory
from megasmol.train.signals import StopRequest
from megasmol.train.state import TrainResult, TrainState
from megasmol.train.step import StepOutcome, skip_step, train_step
from megasmol.utils.fs import atomic_write_text, shown, shown_paths

if TYPE_CHECKING:
    from megasmol.train.inprocess import Attempt
    from megasmol.train.local_copies import LocalCopies

__all__ = ["SaveFailed", "Trainer", "TrainingDiverged", "TrainResult", "train"]


class RollbackNeeded(Exception):
    def __init__(self, step: int):
        self.step = step


class Trainer:
    def __init__(self, setup: TrainingSetup, local: Optional[LocalCopies] = None):
        """``local``: an in-process restart's local copies (``resilience.local_checkpoint_every``)."""
        self.s, self.config = setup, setup.config
        self.local = local
        self.resumed_source = ""
        """What the run resumed from, where local copies are kept: "local copy" or "latest
        checkpoint" (the line of an in-process restart says it)."""
        self.total_steps = setup.batches.last_step
        self.state = TrainState(skip_batches=[list(r) for r in self.config.spikes.skip_batches])
        self.guard = StepGuard(self.config.spikes)
        self.result = TrainResult()
        self.stop = StopRequest(self.config.checkpoint.save_on_signal)
        self.console = Console(setup.is_logging_rank)
        tokenizer = run_tokenizer_dir(self.config)
        self.checkpoints = Checkpointer(self.config, setup, self.console, tokenizer)
        self.metrics = open_metrics(setup, run_directory(self.config))
        self.ctx = LoopContext(setup, run_directory(self.config), self.total_steps, self.metrics,
                               self.console, self.state)
        self.callbacks = build_callbacks(self.ctx, self.config, tokenizer_dir=tokenizer,
                                         prune_uploaded=self.checkpoints.prune_uploaded,
                                         signalled_at=lambda: self.stop.since)
        self.checkpoints.hooks = self.callbacks

    def _set_state(self, state: TrainState) -> None:
        self.state = self.ctx.state = state

    def save(self, reason: str):
        self.result.checkpoint = self.checkpoints.save(self.state.step, self._metadata, reason)
        return self.result.checkpoint

    def _metadata(self) -> dict:  # collective
        return checkpoint_metadata(self.s, self.state, self.guard, self.total_steps)

    def restore(self, path) -> None:
        self._set_state(resume(self.checkpoints, path, self.s, self.guard, self.console,
                               self.state.skip_batches))

    # ----- the loop ----------------------------------------------------------------------
    def _resume_from_local_copy(self, latest: Optional[Path]) -> bool:
        """Collective: load the newest local copy where it is newer than ``latest``; whether it
        was loaded."""
        if self.local is None:
            return False
        newest = self.local.newest()
        if newest is None or (latest is not None and newest <= read_metadata(latest)["step"]):
            self.resumed_source = "latest checkpoint" if latest is not None else ""
            return False
        self._set_state(train_state_from(self.local.restore(), self.s, self.guard,
                                         self.state.skip_batches))
        self.resumed_source = "local copy"
        self.console.print(f"resumed from the local copy of step {self.state.step} in "
                           f"{shown(self.local.manager.local_ckpt_dir.parent)}")
        return True

    def run(self) -> TrainResult:
        self.checkpoints.recover()
        latest = self.checkpoints.latest() if self.config.checkpoint.resume else None
        if self._resume_from_local_copy(latest):
            self.result.resumed_from = self.state.step
        elif latest is not None:
            self.restore(latest)
            self.result.resumed_from = self.state.step
            self.console.print(f"resumed from {shown(latest)} at step {self.state.step}")
        elif self.s.branch is not None:
            self.state.consumed_tokens = branch(self.checkpoints, self.s.branch, self.s, self.console,
                                                self.total_steps)
        if self.local is not None:
            self.local.drop_after(self.state.step)  # a copy only some ranks made: made again
        if self.s.is_logging_rank:  # what compare and ablate read to group runs
            atomic_write_text(RunDir(self.ctx.run_dir).run_config,
                              json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        stop_after = self.config.training.stop_after_step
        try:
            while True:
                try:
                    if stop_after is None or self.state.step < stop_after:
                        self.run_steps(until=stop_after)
                    break
                except RollbackNeeded as spike:
                    self._rollback(spike.step)
        except TrainingDiverged as exc:  # the run's own marker, which compare counts
            self.ctx.emit(Kind.DIVERGED, {"step": self.state.step, "reason": str(exc)})
            raise
        self.result.last_step = self.state.step
        self.checkpoints.finish()
        if (self.config.checkpoint.save_at_end and self.result.stopped_by is None
                and self.state.step in (self.total_steps, stop_after)):
            self.save("end")  # not again when this step is already the latest checkpoint
        self.checkpoints.finish()
        return self.result

    def _rollback(self, spike_step: int) -> None:
        self.callbacks.on_rollback(spike_step)
        self.checkpoints.finish()
        latest = self.checkpoints.latest()
        if self.result.rollbacks >= self.config.spikes.max_rollbacks:
            raise TrainingDiverged(f"loss spike at step {spike_step} after {self.result.rollbacks} "
                                   "rollbacks (spikes.max_rollbacks); stopping: the checkpoints keep "
                                   "the weights before it (lower the LR, or skip the data with "
                                   "spikes.skip_batches)")
        self.result.rollbacks += 1
        if latest is None:
            raise TrainingDiverged(f"loss spike at step {spike_step}: policy rollback, but there is no "
                                   "checkpoint yet (save earlier with checkpoint.interval, or use "
                                   "spikes.policy skip)")
        self.restore(latest)
        if self.local is not None:
            self.local.drop_after(self.state.step)  # the copies of the steps it redoes
        first = self.state.step + 1
        self.state.add_skip(first, spike_step)
        self.console.print(f"rolled back to {latest.name}; data of steps {first}..{spike_step} will "
                           f"be skipped (add [{first}, {spike_step}] to spikes.skip_batches to keep it so)")

    def run_steps(self, until: Optional[int] = None) -> None:
        """Train from the step after ``state.step`` to ``until`` (default: the end of the plan)."""
        setup, config, hooks = self.s, self.config, self.callbacks
        stats, run_started, steps_done = IntervalStats(), time.perf_counter(), 0
        hooks.on_train_start(self.state.step)
        batches = setup.batches.iterate(self.state.step + 1, prefetch=config.data.prefetch)
        for step, plan, micro in batches:
            hooks.on_step_start(step)
            lr = lr_at(config.schedule, step, self.total_steps)
            tokens = plan.batch.at(step) * plan.seq_length
            self.state.consumed_tokens += tokens
            if self.state.skipped(step):
                stats.skipped += 1
                stats.add(None, None, 0)
                stop_agreed = skip_step(setup, step, stop=self.stop.requested)
            else:
                outcome = train_step(setup, step, micro, lr, stop=self.stop.requested, guard=self.guard)
                self._act_on_guard(step, outcome, stats)
                stats.add(outcome.totals.loss, outcome.grad_norm, tokens, outcome.totals.metrics)
                self.result.record_loss(step, outcome.totals.loss)
                stop_agreed = outcome.totals.stop
            hooks.on_step_end(step)
            stop_agreed = self.stop.agree(stop_agreed)
            self.state.step, steps_done = step, steps_done + 1
            self.checkpoints.poll()  # a background save that failed is raised here
            if step % config.logging.interval == 0 or step == self.total_steps:
                record = self.metrics.interval_record(
                    step, self.total_steps, plan.stage.name, lr, stats, run_started, steps_done,
                    self.state.consumed_tokens)
                hooks.on_log(record, stats.steps)
                stats = IntervalStats()
            paused = time.perf_counter()  # validation and saving do not count as step time
            hooks.on_step_done(step)
            if stop_agreed:  # never a rank's own flag: all ranks stop after the same step
                self.result.stopped_by = self.stop.signal_name
                self.save("signal")
                self.console.print(f"stopped by {self.stop.signal_name} after step {step}; run "
                                   "the same command again to resume")
                break
            if self.checkpoints.due(step):
                self.save("interval")
            if self.local is not None and self.local.due(step):
                self.local.save(step, self._metadata())
            stats.exclude(time.perf_counter() - paused)
            if until is not None and step >= until:
                break

    def _act_on_guard(self, step: int, outcome: StepOutcome, stats: IntervalStats) -> None:
        """Log the guard's decision; raise for a rollback or a divergence."""
        decision = outcome.decision
        assert decision is not None, "the loop's steps always run with its guard"
        for kind, record, line in self.guard.reports(step, outcome.totals.loss, decision):
            self.ctx.emit(kind, record, line)
        stats.spikes += decision.spike is not None
        if decision.action == "rollback":
            raise RollbackNeeded(step)
        stats.nan += decision.nonfinite is not None
        stats.skipped += not outcome.applied
        if decision.action == "diverged":
            raise self.guard.diverged(step, decision)

    def close(self, peers_lost: bool = False) -> None:
        """Wait for pending saves and close every callback; with ``peers_lost``, wait for
        nothing that needs the other ranks."""
        try:
            self.checkpoints.close(peers_lost)
        finally:
            self.callbacks.close(stopped_by_signal=self.stop.signal_name is not None,
                                 peers_lost=peers_lost)
            self.stop.restore()
            self.s.close()


def train(config: RunConfig, attempt: Optional[Attempt] = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; collective under torchrun.

    ``attempt``: one attempt of an in-process restart (``train/inprocess.py``): its process group
    gets its own store prefix, what it holds is handed over so a fault's clean-up can free it, and a
    failure is left to NVRx to report and heal (nothing here closes or waits for a peer then)."""
    init_distributed(config.training.collective_timeout_s,
                     store_prefix=None if attempt is None else attempt.store_prefix)
    with RunLock(run_directory(config), config.checkpoint_dir) as lock:
        prepare_bucket(config)  # an s3:// checkpoint.dir, init_from or branch_from: checked first
        setup = build_setup(config, audit=attempt is None or attempt.iteration == 0)
        trainer = Trainer(setup, local=attempt.open_local_copies(setup) if attempt is not None else None)
        if attempt is not None:
            attempt.hold(trainer, lock)
        try:
            result = trainer.run()
        except BaseException as exc:
            if attempt is not None:
                # Nothing closed here: NVRx may raise its interruption into this thread at any
                # line until the attempt has left this function; the trainer is closed by NVRx's
                # finalize hook (``Attempt.free``), where no interruption arrives.
                attempt.failed(exc)
                raise
            trainer.callbacks.on_error(exc)
            lost = (describe_collective_failure(exc)
                    if isinstance(exc, RuntimeError) and not isinstance(exc, RunFailure) else None)
            if lost is not None:
                # Said now, while the stop signals are still held: a launcher that saw the peer
                # die sends this rank SIGTERM next, which would end it before the CLI prints.
                print(f"megasmol train: error: {shown_paths(lost)}", file=sys.stderr, flush=True)
            trainer.close(peers_lost=lost is not None)
            if lost is not None:
                raise PeerLost(lost, reported=True) from None
            raise
        trainer.close()
        if attempt is not None:
            attempt.released()
    if setup.is_logging_rank and result.trained:
        atomic_write_text(RunDir(run_directory(config)).result, json.dumps(result.to_json(), indent=2))
    return result
