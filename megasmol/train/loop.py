"""``megasmol train``: the step loop over a staged data plan.

Per step: the LR from the schedule, forward/backward of every micro-batch through Megatron-Core's
pipeline schedule, one all-reduce that gives every rank the global loss (and any stop request),
the spike policy, the optimizer step (clipped, NaN-safe), metrics, validation, checkpoints.
Steps in ``spikes.skip_batches`` (or skipped by a rollback) run nothing but still advance the
step counter and the schedule, so the data of every other step never moves.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megasmol.ckpt import train_state
from megasmol.ckpt.checkpoint import latest_iteration
from megasmol.config.run import RunConfig
from megasmol.data.masking import context_parallel_share, model_inputs
from megasmol.model.flops import flops_per_token
from megasmol.runtime.distributed import current_device
from megasmol.train.metrics import IntervalStats, MetricsLog, device_peak_tflops
from megasmol.train.optimizer import apply_learning_rate
from megasmol.train.schedules import lr_at
from megasmol.train.setup import TrainingSetup, build_setup, run_directory
from megasmol.train.signals import StopRequest
from megasmol.train.spikes import SpikeDetector
from megasmol.train.step import forward_backward, global_loss
from megasmol.utils import faults

log = logging.getLogger(__name__)


class RollbackNeeded(Exception):
    def __init__(self, step: int):
        self.step = step


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
        self.result = TrainResult(last_step=0)
        total = setup.batches.last_step
        seq = max(p.seq_length for p in setup.batches.plans)
        self.metrics = MetricsLog(
            self.run_dir, active=setup.is_logging_rank, tensorboard=self.config.logging.tensorboard,
            jsonl=self.config.logging.jsonl, flops_per_token=flops_per_token(setup.spec, seq),
            world_size=setup.rank.world_size,
            peak_tflops=device_peak_tflops(self.config.training.precision,
                                           self.config.logging.peak_tflops),
            nvml=self.config.logging.nvml)
        self.total_steps = total
        self.stop = StopRequest(self.config.checkpoint.save_on_signal)
        self.tokenizer = self.config.tokenizer_dir()
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
                            "skip_batches": self.skip_ranges},
        }

    def save(self) -> Path:
        """Write a checkpoint of this step; with async saving, return once it is scheduled."""
        self.finish_pending_saves()  # one save in flight at a time
        started = time.perf_counter()

        def committed(path: Path) -> None:  # rank 0, once the checkpoint is complete
            self._after_save(path)
            self._print(f"saved checkpoint {path} ({time.perf_counter() - started:.1f}s)")

        path = train_state.save_training_checkpoint(
            self.s.model, self.s.optimizer, self.ckpt_dir, self.step, self._metadata(),
            tokenizer_source=self.tokenizer, async_queue=self.async_queue, on_commit=committed)
        self.result.checkpoint = path
        return path

    def finish_pending_saves(self) -> None:
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def _after_save(self, path: Path) -> None:
        ckpt = self.config.checkpoint
        train_state.prune_checkpoints(self.ckpt_dir, ckpt.keep_last)
        if ckpt.post_save_command:
            ok = train_state.run_post_save_command(ckpt.post_save_command, path, self.step)
            if ok and ckpt.delete_after_upload:  # uploaded: only the newest stays local
                train_state.prune_checkpoints(self.ckpt_dir, keep_last=1)

    def restore(self, path: Path) -> None:
        meta = train_state.load_training_checkpoint(self.s.model, self.s.optimizer, path)
        changed = _changed_fields(meta.get("run_config", {}), self.config.to_dict())
        if changed:
            self._print(f"note: the config differs from the one {path.name} was written with: "
                        + ", ".join(changed))
        state = meta["train_state"]
        self.step = state["step"]
        self.spikes = SpikeDetector(self.config.spikes, state.get("spike_window"))
        for pair in state.get("skip_batches", []):
            if pair not in self.skip_ranges:
                self.skip_ranges.append(list(pair))

    def skipped(self, step: int) -> bool:
        return any(first <= step <= last for first, last in self.skip_ranges)

    # ----- the loop ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.s.is_logging_rank:
            stale = train_state.remove_stale_partials(self.ckpt_dir)
            if stale:
                self._print(f"removed {len(stale)} interrupted save(s): {', '.join(p.name for p in stale)}")
        torch.distributed.barrier()
        latest = latest_iteration(self.ckpt_dir) if self.config.checkpoint.resume else None
        if latest is not None:
            self.restore(latest)
            self.result.resumed_from = self.step
            self._print(f"resumed from {latest} at step {self.step}")
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
        saved_last = self.result.checkpoint is not None and self.result.checkpoint.name.endswith(
            f"iter_{self.step:07d}")
        if (self.config.checkpoint.save_at_end and self.result.stopped_by is None
                and self.step in (self.total_steps, stop_after) and not saved_last):
            self.save()
        self.finish_pending_saves()
        return self.result

    def _rollback(self, spike_step: int) -> None:
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
        for step, plan, micro in setup.batches.iterate(first, prefetch=config.data.prefetch):
            lr = lr_at(config.schedule, step, self.total_steps)
            tokens = plan.batch.at(step) * plan.seq_length
            if self.skipped(step):
                stats.skipped += 1
                stats.add(None, None, 0)
            else:
                apply_learning_rate(setup.optimizer, lr, config.optim.weight_decay)
                if faults.planned_at("corrupt_batch", step):
                    micro = _corrupted(micro, setup.spec.vocab_size, step)
                inputs = [context_parallel_share(
                    model_inputs(mb, eod, config.data.document_masking, setup.mask_format,
                                 config.data.reset_position_ids)).to(current_device()) for mb in micro]
                setup.ddp_model.zero_grad_buffer()
                setup.optimizer.zero_grad()
                local = forward_backward(setup.ddp_model, inputs)
                loss, _, stop = global_loss(local, 1.0 if self.stop.requested else 0.0)
                grad_norm = self._update(step, loss, stats)
                stats.add(loss, grad_norm, tokens)
                self.result.losses[step] = loss
                if stop and self.stop.signal_name is None:
                    self.stop.signal_name = "signal on another rank"
            self.step = step
            steps_done += 1
            if self.async_queue is not None:
                self.async_queue.maybe_finalize_async_calls(blocking=False)
            if progress is not None:
                progress.update(1)
            if step % config.logging.interval == 0 or step == self.total_steps:
                record = self.metrics.interval_record(step, self.total_steps, plan.stage.name, lr, stats,
                                                      run_started, steps_done)
                self.metrics.write(record)
                self._print(self.metrics.console_line(record, self.total_steps), progress)
                stats = IntervalStats()
            paused = time.perf_counter()  # validation and saving do not count as step time
            if config.eval.interval and config.eval.steps and step % config.eval.interval == 0:
                self._validate(step, progress)
            if self.stop.requested:
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

    def _update(self, step: int, loss: float, stats: IntervalStats) -> Optional[float]:
        """Apply the spike policy, then the optimizer step; returns the grad norm."""
        policy = self.config.spikes.policy
        verdict = self.spikes.check(step, loss)
        if verdict is not None:
            stats.spikes += 1
            stats.nan += int(not math.isfinite(loss))
            self._print(f"loss spike: {verdict.describe()}; policy {policy}")
            self.metrics.write({"step": step, "loss": loss, "policy": policy,
                                "window_mean": verdict.mean}, kind="spike")
            if policy == "rollback":
                raise RollbackNeeded(step)
            if policy == "skip" or not math.isfinite(loss):
                stats.skipped += 1
                return None
        success, grad_norm, _ = self.s.optimizer.step()
        if not success or grad_norm is None or not math.isfinite(grad_norm):
            stats.nan += 1
            stats.skipped += 1
            return None
        return float(grad_norm)

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
            local = forward_backward(setup.ddp_model, inputs, forward_only=True)
        setup.ddp_model.train()
        loss, tokens, _ = global_loss(local)
        self.result.validation[step] = loss
        self.metrics.write({"step": step, "loss": loss, "tokens": tokens,
                            "perplexity": math.exp(min(loss, 50))}, kind="validation")
        self._print(f"validation at step {step}: loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f}, "
                    f"{tokens:,} tokens)", progress)

    def _print(self, text: str, progress=None) -> None:
        if not self.s.is_logging_rank:
            return
        if progress is not None:
            progress.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.stop.restore()
        self.metrics.close()
        if self.async_queue is not None:
            self.async_queue.close()


# Sections whose change alters what the resumed steps do (not where logs or checkpoints go).
RESUME_SENSITIVE = ("model", "data", "training", "optim", "schedule", "spikes")


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
    setup = build_setup(config)
    trainer = Trainer(setup)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if setup.is_logging_rank and result.losses:
        (run_directory(config) / "result.json").write_text(json.dumps(
            {"last_step": result.last_step, "stopped_by": result.stopped_by,
             "resumed_from": result.resumed_from, "rollbacks": result.rollbacks,
             "checkpoint": str(result.checkpoint) if result.checkpoint else None}, indent=2))
    return result
