"""The RL run's batch source: what ``TrainingBatches`` is to a dataset, rollouts are to RL.

The loop asks for step ``s``'s micro-batches after step ``s - 1``'s update, so rollouts are
sampled by the weights being trained (no prefetching: a batch made ahead would be off-policy).
With ``rl.num_iterations`` = k, one rollout batch serves k consecutive steps: it is sampled at
the first of them, and the log-probs of its completions before that step's update are kept as
the old ones (one forward-only pass, in the same packing as training). A batch is saved under
``<run_dir>/rollouts/`` when it is made, so a run resumed in the middle of its k steps trains on
the same completions; prompts and sampling seeds are pure functions of the step
(:mod:`megasmol.rl.order`), so nothing else needs saving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from megasmol.data.recipe import StagePlan, stage_for_step
from megasmol.rl.pack import pack_rows
from megasmol.rl.rollout import RolloutContext, run_rollout
from megasmol.utils.fs import atomic_write_bytes

ROLLOUT_ONLY = ("rollout_logps", "rollout_entropies")
"""Micro-batch fields that hold for the weights that sampled the batch: its first update only."""

FLAT_STEPS = 5
"""Rollout batches in a row without reward variance before the run says so."""


class RolloutBatches:
    """Micro-batches of packed completions, one rollout batch per ``rl.num_iterations`` steps."""

    def __init__(self, plans: list[StagePlan], micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_iterations: int, mask_truncated: bool, eod: int, rollout_dir: Path):
        self.plans = plans
        self.stages: list = []  # no datasets behind the steps
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.num_micro_batches = 0
        self.num_iterations, self.mask_truncated, self.eod = num_iterations, mask_truncated, eod
        self.rollout_dir = rollout_dir
        self.context: Optional[RolloutContext] = None
        self.old_logps: Optional[Callable[[list[dict]], None]] = None
        """Set by the objective: attaches ``old_logps`` (and reference ones) to micro-batches."""
        self.on_rollout: Callable[[dict[str, float]], None] = lambda metrics: None
        self._batch: Optional[tuple[int, list[dict], dict[str, float]]] = None
        self._flat_since: Optional[int] = None  # first of the latest run of steps with no signal

    @property
    def last_step(self) -> int:
        return self.plans[-1].last_step

    def stage_at(self, step: int) -> StagePlan:
        return stage_for_step(self.plans, step)

    def tokens_through(self, step: int) -> int:
        return sum((plan.batch.samples_through(min(plan.last_step, step))
                    - plan.batch.samples_through(plan.first_step - 1)) * plan.seq_length
                   for plan in self.plans if plan.first_step <= step)

    def validation_micro_batches(self, step: int, num_steps: int) -> list[dict]:
        return []

    def iterate(self, first_step: int, prefetch: int = 0) -> Iterator[tuple[int, StagePlan, list[dict]]]:
        """Lazily (``prefetch`` is ignored): each step's batch is made when the loop asks for it."""
        for step in range(first_step, self.last_step + 1):
            yield step, self.stage_at(step), self.micro_batches(step)

    def micro_batches(self, step: int) -> list[dict]:
        first = step - (step - 1) % self.num_iterations  # the step that sampled this batch
        if self._batch is None or self._batch[0] != first:
            self._batch = (self._load(first) if step != first else None) or self._make(first)
        _, micro, metrics = self._batch
        if step == first:
            self.on_rollout(metrics)
            return micro
        # Later updates on the same batch report its rewards again, not its sampling.
        self.on_rollout({k: v for k, v in metrics.items() if not k.startswith(("time/", "rollout/"))})
        return [{k: v for k, v in mb.items() if k not in ROLLOUT_ONLY} for mb in micro]

    def _make(self, step: int) -> tuple[int, list[dict], dict[str, float]]:
        assert self.context is not None, "the RL objective binds the rollout context at set-up"
        plan = self.stage_at(step)
        prompts = plan.batch.at(step) // self.context.rl.num_generations
        rollout = run_rollout(self.context, step, plan.index, prompts)
        # A rank left without completions trains one micro-batch of padding (no loss).
        micro = pack_rows(rollout.packed(self.mask_truncated), plan.seq_length, self.eod,
                          rows_per_micro=self.micro_batch_size, at_least_one=True)
        if self.old_logps is not None:
            self.old_logps(micro)
        self._watch_signal(step, rollout.metrics)
        batch = (step, micro, rollout.metrics)
        if self.num_iterations > 1:
            self._save(batch)
        return batch

    def _watch_signal(self, step: int, metrics: dict[str, float]) -> None:
        """Say so once when every group of :data:`FLAT_STEPS` rollout batches in a row had equal
        rewards: their advantages are all 0, so those steps train nothing."""
        if metrics.get("frac_reward_zero_std", 0.0) < 1.0:
            self._flat_since = None
            return
        if self._flat_since is None:
            self._flat_since = step
        flat = (step - self._flat_since) // self.num_iterations + 1
        if flat == FLAT_STEPS and self.context is not None:
            self.context.say(f"steps {self._flat_since}-{step}: every group's completions got equal "
                             f"rewards ({metrics.get('reward', float('nan')):.3f}), so the advantages "
                             "are 0 and nothing is learned: check the rewards against a few "
                             "completions, raise rl.temperature, or use rl.dynamic_sampling")

    def _path(self) -> Path:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return self.rollout_dir / f"rank{rank}.pt"

    def _save(self, batch: tuple[int, list[dict], dict[str, float]]) -> None:
        import io

        buffer = io.BytesIO()
        torch.save({"step": batch[0], "micro": batch[1], "metrics": batch[2]}, buffer)
        self.rollout_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(), buffer.getvalue())

    def _load(self, step: int) -> Optional[tuple[int, list[dict], dict[str, float]]]:
        path = self._path()
        if not path.is_file():
            return None
        saved: Any = torch.load(path, weights_only=True)
        if saved.get("step") != step:
            return None
        return step, saved["micro"], saved["metrics"]
