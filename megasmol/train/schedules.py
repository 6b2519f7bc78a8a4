"""Learning-rate schedules as pure functions of the step (1-based: the LR step ``s`` uses).

Being a function of the step alone, a schedule needs no state in a checkpoint beyond the step,
and resuming at any step gives exactly the LR an uninterrupted run had.

* ``wsd``: linear warmup, a constant stable phase, then a decay to ``min_lr`` over the last
  ``decay_steps`` (or ``decay_fraction`` of the run) with a linear, cosine or 1-sqrt shape
  (SmolLM3: 2e-4, 2000 warmup steps, linear decay to 0 over the last 522,000 of 4.72M steps);
* ``cosine``: warmup, then cosine from ``lr`` to ``min_lr`` at the last step;
* ``multistep``: warmup, then ``lr`` multiplied by each factor in ``decay_factors`` once the run
  passes the matching fraction in ``milestones`` (DeepSeek's 80/10/10: factors 0.316 and 0.1);
* ``constant``: warmup, then ``lr``;
* ``decay``: for a branch (``checkpoint.branch_from``): ``lr`` is set to the LR the source run
  had at the branch step (read from its checkpoint), then decays to ``min_lr`` at this run's last
  step with ``decay_shape`` (after ``warmup_steps``, usually 0): an annealing run.
"""

from __future__ import annotations

import math

from megasmol.config.schedule import DEFAULT_DECAY_FRACTION, ScheduleConfig  # noqa: F401 (re-exported)

SHAPES = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
}


def lr_at(config: ScheduleConfig, step: int, total_steps: int) -> float:
    """The learning rate of (1-based) ``step`` in a run of ``total_steps``."""
    if step < 1:
        raise ValueError(f"steps are 1-based, got {step}")
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.kind == "constant":
        return config.lr
    if config.kind == "multistep":
        factor = 1.0
        for milestone, decay in zip(config.milestones, config.decay_factors):
            if step > milestone * total_steps:
                factor = decay
        return config.lr * factor
    if config.kind == "cosine":
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr + (config.lr - config.min_lr) * SHAPES["cosine"](progress)
    if config.kind == "decay":  # step warmup+1 runs at lr, the last step at min_lr
        span = max(1, total_steps - config.warmup_steps - 1)
        progress = min(1.0, (step - config.warmup_steps - 1) / span)
        return config.min_lr + (config.lr - config.min_lr) * SHAPES[config.decay_shape](progress)
    decay = config.decay_length(total_steps)
    decay_start = total_steps - decay  # last stable step
    if step <= decay_start:
        return config.lr
    progress = min(1.0, (step - decay_start) / decay)
    return config.min_lr + (config.lr - config.min_lr) * SHAPES[config.decay_shape](progress)
