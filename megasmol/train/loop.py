"""``megasmol train``: the step loop over a staged data plan.

Per step: the LR from the schedule, forward/backward of every micro-batch through Megatron-Core's
pipeline schedule, one all-reduce that gives every rank the global loss (and any stop request),
the spike policy, the optimizer step (clipped, NaN-safe), metrics, validation, checkpoints.
Steps in ``spikes.skip_batches`` (or skipped by a rollback) run nothing but still advance the
step counter and the schedule, so the data of every other step never moves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megasmol.ckpt import train_state
from megasmol.ckpt.checkpoint import (atomic_write_text, describe_error, disk_full, iteration_dirname,
                                      latest_iteration, load_errors, recover_interrupted_saves)
from megasmol.ckpt.post_save import PostSaveRunner
from megasmol.config.run import RunConfig
from megasmol.data.masking import context_parallel_share, model_inputs
from megasmol.model.flops import flops_per_token
from megasmol.runtime.distributed import (PeerLost, current_device, describe_collective_failure,
                                          init_distributed)
from megasmol.runtime.run_lock import RunLock
from megasmol.train.nvrx import NvrxHeartbeats
from megasmol.train.metrics import IntervalStats, MetricsLog, NvmlSampler, device_peak_tflops
from megasmol.train.optimizer import apply_learning_rate, local_gradients_finite
from megasmol.train.schedules import lr_at
from megasmol.train.setup import TrainingSetup, build_setup, run_directory
from megasmol.train.signals import StopRequest
from megasmol.train.spikes import SpikeDetector
from megasmol.train.step import any_rank, forward_backward, global_loss
from megasmol.train.throughput_watch import ThroughputWatch
from megasmol.train.trackers import build_trackers
from megasmol.train.watchdog import HangWatchdog
from megasmol.utils import faults

log = logging.getLogger(__name__)


class RollbackNeeded(Exception):
    def __init__(self, step: int):
        self.step = step


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class SaveFailed(RuntimeError):
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


@dataclass
class TrainResult:
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)
    validation: dict[int, float] = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    stopped_by: Optional[str] = None
    resumed_from: Optional[int] = None
    rollbacks: int = 0

    def first_and_last_loss(self, window: int = 10) -> tuple[float, float]:
        steps = sorted(self.losses)
        head = [self.losses[s] for s in steps[:window]]
        tail = [self.losses[s] for s in steps[-window:]]
        return sum(head) / len(head), sum(tail) / len(tail)


class Trainer:
    def __init__(self, setup: TrainingSetup):
        self.s = setup
        self.config = setup.config
        self.ckpt_dir = self.config.checkpoint_dir
        self.run_dir = run_directory(self.config)
        self.skip_ranges = [list(r) for r in self.config.spikes.skip_batches]
        self.spikes = SpikeDetector(self.config.spikes)
        self.step = 0
        self.consumed_tokens = 0
        self.result = TrainResult(last_step=0)
        total = setup.batches.last_step
        seq = max(p.seq_length for p in setup.batches.plans)
        self.metrics = MetricsLog(
            self.run_dir, active=setup.is_logging_rank, jsonl=self.config.logging.jsonl,
            trackers=lambda: build_trackers(self.config.logging, self.run_dir, self.config.to_dict()),
            flops_per_token=flops_per_token(setup.spec, seq),
            world_size=setup.rank.world_size,
            peak_tflops=device_peak_tflops(self.config.training.precision,
                                           self.config.logging.peak_tflops),
            nvml=self.config.logging.nvml)
        self.total_steps = total
        self.stop = StopRequest(self.config.checkpoint.save_on_signal)
        self.watchdog = HangWatchdog(self.config.watchdog, self.run_dir, setup.rank.rank)
        self.heartbeats = NvrxHeartbeats(self.config.watchdog.nvrx_heartbeats)
        logging_config = self.config.logging
        self.throughput = ThroughputWatch(logging_config.expected_tokens_per_s_per_gpu,
                                          logging_config.throughput_fraction,
                                          logging_config.throughput_window)
        watched = logging_config.nvml and logging_config.expected_tokens_per_s_per_gpu
        self.nvml = NvmlSampler() if watched else None  # every rank: its own GPU
        self.nonfinite_in_a_row = 0
        self.tokenizer = self.config.tokenizer_dir()
        from megasmol.eval.in_loop import maybe_evaluation

        self.downstream = maybe_evaluation(self.config, setup.spec, self.tokenizer)
        ckpt = self.config.checkpoint
        self.post_save = None
        if ckpt.post_save_command and setup.is_logging_rank:
            uploaded = self._prune_uploaded if ckpt.delete_after_upload else None
            self.post_save = PostSaveRunner(ckpt.post_save_command, ckpt.post_save_timeout_s,
                                            on_success=uploaded)
        self.async_queue = None
        if self.config.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    # ----- state -------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {
            "model_spec": self.s.spec.to_dict(),
            "params_dtype": str(self.s.params_dtype).removeprefix("torch."),
            "run_config": self.config.to_dict(),
            "train_state": {"step": self.step, "spike_window": self.spikes.state(),
                            "skip_batches": self.skip_ranges,
                            "weights_finite": self._weights_finite(),
                            "lr": lr_at(self.config.schedule, self.step, self.total_steps)
                            if self.step else None,
                            "consumed_tokens": self.consumed_tokens,
                            "branch": self.s.branch.to_json() if self.s.branch else None},
        }

    def _weights_finite(self) -> bool:
        """Collective: every rank's parameters are finite."""
        local = all(bool(torch.isfinite(p).all()) for p in self.s.model.parameters())
        return not any_rank(not local)

    def save(self) -> Path:
        """Write a checkpoint of this step; with async saving, return once it is scheduled.

        A step that already has the latest complete checkpoint (a rerun of a finished run or
        stage) is not written again: the complete copy is never touched."""
        self.finish_pending_saves()  # one save in flight at a time
        latest = latest_iteration(self.ckpt_dir)
        if latest is not None and latest.name == iteration_dirname(self.step):
            self.result.checkpoint = latest
            return latest
        started = time.perf_counter()

        def committed(path: Path) -> None:  # rank 0, once the checkpoint is complete
            self._after_save(path)
            self._print(f"saved checkpoint {path} ({time.perf_counter() - started:.1f}s)")

        with _save_errors(self.ckpt_dir, self.step):
            path = train_state.save_training_checkpoint(
                self.s.model, self.s.optimizer, self.ckpt_dir, self.step, self._metadata(),
                tokenizer_source=self.tokenizer, async_queue=self.async_queue, on_commit=committed)
        self.result.checkpoint = path
        return path

    def finish_pending_saves(self) -> None:
        if self.async_queue is not None:
            with _save_errors(self.ckpt_dir, None):
                self.async_queue.maybe_finalize_async_calls(blocking=True)

    def _after_save(self, path: Path) -> None:
        train_state.prune_checkpoints(self.ckpt_dir, self.config.checkpoint.keep_last)
        if self.post_save is not None:
            self.post_save.submit(path, int(path.name.removeprefix("iter_")))

    def _prune_uploaded(self, path: Path) -> None:  # uploaded: only the newest stays local
        train_state.prune_checkpoints(self.ckpt_dir, keep_last=1)

    def restore(self, path: Path) -> None:
        meta = train_state.load_training_checkpoint(self.s.model, self.s.optimizer, path)
        changed = _changed_fields(meta.get("run_config", {}), self.config.to_dict())
        if changed:
            self._print(f"note: the config differs from the one {path.name} was written with: "
                        + ", ".join(changed))
        state = meta["train_state"]
        self.step = state["step"]
        self.consumed_tokens = state.get("consumed_tokens") or self._tokens_through(self.step)
        self.spikes = SpikeDetector(self.config.spikes, state.get("spike_window"))
        for pair in state.get("skip_batches", []):
            if pair not in self.skip_ranges:
                self.skip_ranges.append(list(pair))

    def _tokens_through(self, step: int) -> int:
        """Training tokens of steps 1..``step`` (for checkpoints that did not record them)."""
        return sum((plan.batch.samples_through(min(plan.last_step, step))
                    - plan.batch.samples_through(plan.first_step - 1)) * plan.seq_length
                   for plan in self.s.batches.plans if plan.first_step <= step)

    def branch(self, point) -> None:
        """Start from the source's model and optimizer state; step, data and schedule are ours."""
        meta = train_state.load_training_checkpoint(self.s.model, self.s.optimizer, point.source)
        # The model's training tokens go on from the source's, so compare lines the two runs up.
        self.consumed_tokens = meta["train_state"].get("consumed_tokens") or 0
        self._print(f"branched from {point.source} (its step {point.step}, lr {point.lr:.3g}): model "
                    f"and optimizer state; schedule {self.config.schedule.kind} from lr "
                    f"{self.config.schedule.lr:.3g} to {self.config.schedule.min_lr:.3g} over "
                    f"{self.total_steps} steps")

    def _nvml_sample(self) -> dict:
        return self.nvml.sample() if self.nvml is not None else {}

    def skipped(self, step: int) -> bool:
        return any(first <= step <= last for first, last in self.skip_ranges)

    # ----- the loop ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.s.is_logging_rank and self.ckpt_dir.is_dir():
            for action in recover_interrupted_saves(self.ckpt_dir):
                self._print(f"checkpoints: {action}")
        torch.distributed.barrier()
        latest = latest_iteration(self.ckpt_dir) if self.config.checkpoint.resume else None
        if latest is not None:
            self.restore(latest)
            self.result.resumed_from = self.step
            self._print(f"resumed from {latest} at step {self.step}")
        elif self.s.branch is not None:
            self.branch(self.s.branch)
        if self.s.is_logging_rank:  # what compare and ablate read to group runs
            atomic_write_text(self.run_dir / "run_config.json",
                              json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        stop_after = self.config.training.stop_after_step
        while True:
            try:
                if stop_after is None or self.step < stop_after:
                    self.run_steps(until=stop_after)
                break
            except RollbackNeeded as spike:
                self._rollback(spike.step)
        self.result.last_step = self.step
        self.finish_pending_saves()
        if (self.config.checkpoint.save_at_end and self.result.stopped_by is None
                and self.step in (self.total_steps, stop_after)):
            self.save()  # not again when this step is already the latest checkpoint
        self.finish_pending_saves()
        return self.result

    def _rollback(self, spike_step: int) -> None:
        self.watchdog.idle()
        self.finish_pending_saves()
        latest = latest_iteration(self.ckpt_dir)
        if self.result.rollbacks >= self.config.spikes.max_rollbacks:
            raise RuntimeError(f"loss spike at step {spike_step} after {self.result.rollbacks} "
                               "rollbacks (spikes.max_rollbacks); stopping")
        self.result.rollbacks += 1
        if latest is None:
            raise RuntimeError(f"loss spike at step {spike_step}: policy rollback, but there is no "
                               "checkpoint yet (save earlier, or use policy skip)")
        self.restore(latest)
        skip = [self.step + 1, spike_step]
        self.skip_ranges.append(skip)
        self._print(f"rolled back to {latest.name}; data of steps {skip[0]}..{skip[1]} will be "
                    f"skipped (add [{skip[0]}, {skip[1]}] to spikes.skip_batches to keep it so)")

    def run_steps(self, until: Optional[int] = None) -> None:
        """Train from the step after ``self.step`` to ``until`` (default: the end of the plan)."""
        setup, config = self.s, self.config
        first = self.step + 1
        stats = IntervalStats()
        run_started, steps_done = time.perf_counter(), 0
        progress = _progress(setup.is_logging_rank and config.logging.progress, first, self.total_steps)
        eod = setup.spec.eos_token_id
        self.watchdog.start()
        for step, plan, micro in setup.batches.iterate(first, prefetch=config.data.prefetch):
            self.watchdog.step_started(step)
            lr = lr_at(config.schedule, step, self.total_steps)
            tokens = plan.batch.at(step) * plan.seq_length
            self.consumed_tokens += tokens
            if self.skipped(step):
                stats.skipped += 1
                stats.add(None, None, 0)
                stop_agreed = any_rank(self.stop.requested)
                faults.signal_if_planned("sigterm_after_reduce", step)
            else:
                apply_learning_rate(setup.optimizer, lr, config.optim.weight_decay)
                if faults.planned_at("corrupt_batch", step):
                    micro = _corrupted(micro, setup.spec.vocab_size, step)
                inputs = [context_parallel_share(
                    model_inputs(mb, eod, config.data.document_masking, setup.mask_format,
                                 config.data.reset_position_ids)).to(current_device()) for mb in micro]
                setup.ddp_model.zero_grad_buffer()
                setup.optimizer.zero_grad()
                faults.hang_if_planned("hang", step)
                local = forward_backward(setup.ddp_model, inputs, objective=setup.objective)
                if faults.planned_at("inf_grad", step):
                    setup.ddp_model.buffers[0].grad_data[0] = float("inf")
                totals = global_loss(local, stop=self.stop.requested,
                                     nonfinite_grads=not local_gradients_finite(setup.ddp_model),
                                     objective=setup.objective)
                faults.signal_if_planned("sigterm_after_reduce", step)
                loss = totals.loss
                grad_norm = self._update(step, loss, totals.nonfinite_grads, stats)
                stats.add(loss, grad_norm, tokens, totals.metrics)
                self.result.losses[step] = loss
                stop_agreed = totals.stop
            self.watchdog.step_finished()
            self.heartbeats.beat()
            if stop_agreed and self.stop.signal_name is None:
                self.stop.signal_name = "signal on another rank"
            self.step = step
            steps_done += 1
            if self.async_queue is not None:
                with _save_errors(self.ckpt_dir, None):  # a background save that failed
                    self.async_queue.maybe_finalize_async_calls(blocking=False)
            if progress is not None:
                progress.update(1)
            if step % config.logging.interval == 0 or step == self.total_steps:
                record = self.metrics.interval_record(step, self.total_steps, plan.stage.name, lr, stats,
                                                      run_started, steps_done)
                record["consumed_tokens"] = self.consumed_tokens
                self.metrics.write(record)
                self._print(self.metrics.console_line(record, self.total_steps), progress)
                warning = self.throughput.check(step, record, stats.steps, self._nvml_sample)
                if warning is not None:
                    self.metrics.write(warning, kind="throughput_warning")
                    self._print(self.throughput.line(warning), progress)
                stats = IntervalStats()
            paused = time.perf_counter()  # validation and saving do not count as step time
            if config.eval.interval and config.eval.steps and step % config.eval.interval == 0:
                self._validate(step, progress)
            if self.downstream is not None and self.downstream.due(step, self.total_steps):
                self._downstream(step, progress)
            if stop_agreed:  # never a rank's own flag: all ranks stop after the same step
                self.result.stopped_by = self.stop.signal_name
                self.save()
                self._print(f"stopped by {self.stop.signal_name} after step {step}; run the same "
                            "command again to resume", progress)
                break
            if config.checkpoint.interval and step % config.checkpoint.interval == 0:
                self.save()
            stats.started += time.perf_counter() - paused
            if until is not None and step >= until:
                break
        if progress is not None:
            progress.close()

    def _update(self, step: int, loss: float, nonfinite_grads: bool,
                stats: IntervalStats) -> Optional[float]:
        """Apply the spike policy, then the optimizer step; returns the grad norm (None when the
        update was not applied)."""
        policy = self.config.spikes.policy
        verdict = self.spikes.check(step, loss)  # a non-finite loss is a spike too
        if verdict is not None:
            stats.spikes += 1
            self._print(f"loss spike: {verdict.describe()}; policy {policy}")
            self.metrics.write({"step": step, "loss": loss, "policy": policy,
                                "window_mean": verdict.mean}, kind="spike")
            if policy == "rollback":
                raise RollbackNeeded(step)
        if nonfinite_grads or not math.isfinite(loss):
            self._nonfinite_step(step, loss, stats)
            return None
        self.nonfinite_in_a_row = 0
        if verdict is not None and policy == "skip":
            stats.skipped += 1
            return None
        success, grad_norm, _ = self.s.optimizer.step()
        if not success or grad_norm is None:
            stats.skipped += 1
            return None
        return float(grad_norm)

    def _nonfinite_step(self, step: int, loss: float, stats: IntervalStats) -> None:
        """No update from a non-finite loss or gradient; too many in a row stop the run."""
        stats.nan += 1
        stats.skipped += 1
        self.nonfinite_in_a_row += 1
        what = "loss" if not math.isfinite(loss) else "gradient"
        limit = self.config.spikes.max_nonfinite_steps
        self._print(f"step {step}: non-finite {what}; update skipped "
                    f"({self.nonfinite_in_a_row} in a row, limit {limit})")
        self.metrics.write({"step": step, "loss": loss, "nonfinite": what,
                            "in_a_row": self.nonfinite_in_a_row}, kind="skipped_update")
        if self.nonfinite_in_a_row >= limit:
            raise TrainingDiverged(
                f"{self.nonfinite_in_a_row} consecutive steps (up to {step}) had a non-finite "
                f"{what} (spikes.max_nonfinite_steps={limit}); no update was applied, and the "
                "checkpoints hold the last finite weights: lower the LR, check the data of these "
                "steps, or skip them with spikes.skip_batches")

    def _validate(self, step: int, progress) -> None:
        setup = self.s
        micro = setup.batches.validation_micro_batches(step, self.config.eval.steps)
        if not micro:
            return
        inputs = [context_parallel_share(
            model_inputs(mb, setup.spec.eos_token_id, self.config.data.document_masking,
                         setup.mask_format, self.config.data.reset_position_ids)).to(current_device())
            for mb in micro]
        setup.ddp_model.eval()
        with torch.no_grad():
            local = forward_backward(setup.ddp_model, inputs, forward_only=True, objective=setup.objective)
        setup.ddp_model.train()
        totals = global_loss(local, objective=setup.objective)
        loss, tokens, unit = totals.loss, totals.tokens, setup.objective.unit
        self.result.validation[step] = loss
        record = {"step": step, "loss": loss, unit: tokens, "consumed_tokens": self.consumed_tokens,
                  **totals.metrics}
        if unit == "tokens":
            record["perplexity"] = math.exp(min(loss, 50))
        self.metrics.write(record, kind="validation")
        detail = (f"ppl {math.exp(min(loss, 50)):.1f}, {tokens:,} tokens" if unit == "tokens" else
                  f"reward acc {totals.metrics.get('rewards/accuracies', float('nan')):.3f}, "
                  f"margin {totals.metrics.get('rewards/margins', float('nan')):.3f}, {tokens:,} {unit}")
        self._print(f"validation at step {step}: loss {loss:.4f} ({detail})", progress)

    def _downstream(self, step: int, progress) -> None:
        results = self.downstream.run(self.s)
        if self.s.is_logging_rank:
            self.downstream.write(step, results, self.run_dir)
        self.metrics.write({**self.downstream.record(step, results),
                            "consumed_tokens": self.consumed_tokens}, kind="downstream")
        self._print(self.downstream.line(step, results), progress)

    def _print(self, text: str, progress=None) -> None:
        if not self.s.is_logging_rank:
            return
        if progress is not None:
            progress.write(text)
        else:
            print(text, flush=True)

    def close(self, peers_lost: bool = False) -> None:
        """Wait for pending saves and post-save commands; with ``peers_lost``, not for saves
        (their commit is a collective that would only time out again)."""
        if self.async_queue is not None and not peers_lost:
            self.async_queue.close()
        if self.post_save is not None:  # after a stop signal, the preemption grace is short
            self.post_save.close(POST_SAVE_GRACE_S if self.stop.signal_name else None)
        self.watchdog.close()
        self.heartbeats.close()
        self.stop.restore()
        self.metrics.close()


POST_SAVE_GRACE_S = 30.0
"""After a stop signal, how long a running post-save command may still take before it is stopped
(the checkpoint itself is already saved; Slurm's --signal=USR1@300 leaves minutes in all)."""

# Sections whose change alters what the resumed steps do (not where logs or checkpoints go).
RESUME_SENSITIVE = ("model", "data", "training", "optim", "schedule", "spikes", "preference")


# Where a run stops is not what its steps do.
RESUME_NEUTRAL = {"training.stop_after_step"}


def _changed_fields(saved: dict, current: dict) -> list[str]:
    changed = []
    for section in RESUME_SENSITIVE:
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                        for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k) and f"{section}.{k}" not in RESUME_NEUTRAL]
        elif old != new and old is not None:
            changed.append(f"{section}: {old!r} -> {new!r}")
    return changed


def _progress(enabled: bool, first: int, last: int):
    import sys

    if not enabled or not sys.stderr.isatty():
        return None  # log lines carry the ETA when nobody watches a terminal
    from tqdm import tqdm

    return tqdm(total=last, initial=first - 1, unit="step", dynamic_ncols=True)


def _corrupted(micro: list[dict], vocab_size: int, step: int) -> list[dict]:
    generator = torch.Generator().manual_seed(step)
    return [{**mb, "tokens": torch.randint(0, vocab_size, mb["tokens"].shape, generator=generator),
             "labels": torch.randint(0, vocab_size, mb["labels"].shape, generator=generator)}
            for mb in micro]


def train(config: RunConfig) -> TrainResult:
    """Run (or resume) the training described by ``config``; collective under torchrun."""
    init_distributed(config.training.collective_timeout_s)
    with RunLock(run_directory(config), config.checkpoint_dir):
        setup = build_setup(config)
        trainer = Trainer(setup)
        try:
            result = trainer.run()
        except (TrainingDiverged, SaveFailed):
            trainer.close()
            raise
        except RuntimeError as exc:
            lost = describe_collective_failure(exc)
            if lost is not None:
                # Said now, while the stop signals are still held: a launcher that saw the peer
                # die sends this rank SIGTERM next, which would end it before the CLI prints.
                print(f"megasmol train: error: {lost}", file=sys.stderr, flush=True)
            trainer.close(peers_lost=lost is not None)
            if lost is not None:
                raise PeerLost(lost, reported=True) from None
            raise
        except BaseException:
            trainer.close()
            raise
        trainer.close()
    if setup.is_logging_rank and result.losses:
        atomic_write_text(run_directory(config) / "result.json", json.dumps(
            {"last_step": result.last_step, "stopped_by": result.stopped_by,
             "resumed_from": result.resumed_from, "rollbacks": result.rollbacks,
             "checkpoint": str(result.checkpoint) if result.checkpoint else None}, indent=2))
    return result
