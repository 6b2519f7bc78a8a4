"""Data recipes: stages of weighted mixtures over Megatron indexed datasets.

A recipe YAML names, for each stage, where it starts (a 1-based training step, as in the
published SmolLM3 configs, or a token count), its sequence length and its ``{path, weight}``
entries.  Paths are prefixes (``PREFIX.bin``/``PREFIX.idx``) relative to ``root``, which may use
environment variables (``${DATA_ROOT}``) and is itself relative to the recipe file, so a
template is pointed at a user's own tokenized copies by setting one variable or one field.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megasmol.config.typed import ConfigError, from_dict, load_yaml

if TYPE_CHECKING:
    from megasmol.config.run import TrainingConfig

REPO_RECIPES = Path(__file__).resolve().parents[2] / "data"


@dataclass
class DatasetEntry:
    """One dataset of a stage's mixture."""

    path: str
    """Indexed-dataset prefix (without .bin/.idx), relative to the recipe's root."""
    weight: float
    """Sampling weight; a stage's weights are normalized to sum to 1 (the audit warns if not)."""
    name: Optional[str] = None
    """Display name (default: the last path component)."""

    def validate(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(f"dataset {self.path}: weight must be a positive number, got {self.weight}")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


@dataclass
class DataStage:
    """A contiguous range of training steps drawing from one mixture."""

    name: str
    """Stage name shown in logs and the audit (e.g. ``stable``, ``decay``)."""
    datasets: list[DatasetEntry]
    """The mixture: indexed datasets and their weights."""
    start_step: Optional[int] = None
    """1-based training step where the stage begins (the first stage starts at 1)."""
    start_tokens: Optional[int] = None
    """Alternative to ``start_step``: the stage begins once this many tokens were trained on."""
    seq_length: Optional[int] = None
    """Sequence length of this stage (default: the run's ``data.seq_length``)."""

    def validate(self) -> None:
        if not self.datasets:
            raise ConfigError(f"stage {self.name}: datasets is empty")
        if (self.start_step is None) == (self.start_tokens is None):
            raise ConfigError(f"stage {self.name}: give exactly one of start_step or start_tokens")
        if self.start_step is not None and self.start_step < 1:
            raise ConfigError(f"stage {self.name}: start_step is 1-based, got {self.start_step}")
        if self.start_tokens is not None and self.start_tokens < 0:
            raise ConfigError(f"stage {self.name}: start_tokens must be >= 0")
        if self.seq_length is not None and self.seq_length < 1:
            raise ConfigError(f"stage {self.name}: seq_length must be >= 1")
        labels = [d.label for d in self.datasets]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ConfigError(f"stage {self.name}: dataset(s) listed twice: {', '.join(repeated)}")

    @property
    def weight_sum(self) -> float:
        return sum(d.weight for d in self.datasets)


@dataclass
class DataRecipe:
    """A multi-stage data mixture."""

    name: str
    """Recipe name."""
    stages: list[DataStage]
    """Stages in training order."""
    root: str = "."
    """Directory the dataset paths are relative to; ``${VAR}`` is expanded; relative to the file."""
    description: str = ""
    """What the recipe is and where its numbers come from."""
    source: str = ""
    """Link to the published config the weights were taken from."""
    base_dir: str = field(default=".", init=False, repr=False)
    """Directory of the recipe file (set by ``load_recipe``)."""

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError(f"recipe {self.name}: stages is empty")
        first = self.stages[0]
        if first.start_step not in (None, 1) or first.start_tokens not in (None, 0):
            raise ConfigError(f"recipe {self.name}: the first stage ({first.name}) must start at "
                              "step 1 (or token 0)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"recipe {self.name}: stage names must be unique")
        for before, after in zip(self.stages, self.stages[1:]):
            if before.start_step is not None and after.start_step is not None \
                    and after.start_step <= before.start_step:
                raise ConfigError(f"recipe {self.name}: stage {after.name} starts at step "
                                  f"{after.start_step}, not after stage {before.name}")
            if before.start_tokens is not None and after.start_tokens is not None \
                    and after.start_tokens <= before.start_tokens:
                raise ConfigError(f"recipe {self.name}: stage {after.name} starts at "
                                  f"{after.start_tokens} tokens, not after stage {before.name}")

    def resolved_root(self, override: Optional[str] = None) -> Path:
        raw = override if override is not None else self.root
        expanded = os.path.expandvars(os.path.expanduser(raw))
        unresolved = re.findall(r"\$\{?(\w+)", expanded)
        if unresolved:
            raise ConfigError(f"recipe {self.name}: root {raw!r} uses unset environment "
                              f"variable(s) {', '.join(sorted(set(unresolved)))}")
        root = Path(expanded)
        return root if root.is_absolute() else (Path(self.base_dir) / root).resolve()

    def dataset_prefix(self, entry: DatasetEntry, root_override: Optional[str] = None) -> Path:
        path = Path(os.path.expandvars(entry.path))
        return path if path.is_absolute() else self.resolved_root(root_override) / path


def load_recipe(name_or_path: str | Path) -> DataRecipe:
    """Load a recipe by path or by name from the repository's ``data/`` folder."""
    path = Path(name_or_path)
    if not path.exists() and not path.suffix:
        candidate = REPO_RECIPES / f"{name_or_path}.yaml"
        if candidate.exists():
            path = candidate
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in REPO_RECIPES.glob("*.yaml")))
        raise ConfigError(f"data recipe {name_or_path}: no such file (built-in recipes: {known})")
    recipe = from_dict(DataRecipe, load_yaml(path), where=f"recipe {path.name}")
    recipe.base_dir = str(path.resolve().parent)
    return recipe


@dataclass(frozen=True)
class BatchSchedule:
    """Sequences per step: ``global_batch_size``, or a linear ramp-up to it.

    With ``rampup_start`` set, step 1 draws ``rampup_start`` sequences and the batch grows by
    ``rampup_increment`` in equal-length levels until step ``rampup_steps`` + 1 reaches
    ``global_batch_size`` (the GPT-3 / Megatron-LM ramp-up, counted in steps).
    """

    global_batch_size: int
    rampup_start: Optional[int] = None
    rampup_increment: int = 0
    rampup_steps: int = 0

    def levels(self) -> list[int]:
        if self.rampup_start is None:
            return [self.global_batch_size]
        return list(range(self.rampup_start, self.global_batch_size, self.rampup_increment)) + [
            self.global_batch_size]

    def at(self, step: int) -> int:
        """Sequences drawn at (1-based) ``step``."""
        levels = self.levels()
        if len(levels) == 1 or step > self.rampup_steps:
            return self.global_batch_size
        per_level = self.rampup_steps / (len(levels) - 1)
        return levels[min(int((step - 1) // per_level), len(levels) - 2)]

    def samples_through(self, step: int) -> int:
        """Sequences drawn by steps 1..``step``."""
        ramp = min(step, self.rampup_steps) if self.rampup_start is not None else 0
        return sum(self.at(s) for s in range(1, ramp + 1)) + (step - ramp) * self.global_batch_size

    def steps_to_draw(self, first_step: int, samples: int) -> int:
        """Steps from ``first_step`` until at least ``samples`` sequences are drawn."""
        steps = 0
        while samples > 0 and first_step + steps <= self.rampup_steps:
            samples -= self.at(first_step + steps)
            steps += 1
        return steps + max(0, math.ceil(samples / self.global_batch_size))


def batch_schedule(training: TrainingConfig) -> BatchSchedule:
    """The run's sequences per step: ``training.global_batch_size``, after its ``batch_rampup``."""
    ramp = training.batch_rampup
    if ramp is None:
        return BatchSchedule(training.global_batch_size)
    return BatchSchedule(training.global_batch_size, ramp.start, ramp.increment, ramp.steps)


@dataclass(frozen=True)
class StagePlan:
    """Where one stage sits in a run: steps (1-based, inclusive) and what they draw."""

    index: int
    stage: DataStage
    first_step: int
    last_step: int
    seq_length: int
    batch: BatchSchedule

    @property
    def global_batch_size(self) -> int:
        """Sequences per step once any ramp-up is over."""
        return self.batch.global_batch_size

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1

    @property
    def samples(self) -> int:
        return self.batch.samples_through(self.last_step) - self.batch.samples_through(self.first_step - 1)

    def first_sample(self, step: int) -> int:
        """Stage-local index of the first sequence drawn at ``step``."""
        return self.batch.samples_through(step - 1) - self.batch.samples_through(self.first_step - 1)

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_length


def plan_stages(recipe: DataRecipe, train_steps: int, global_batch_size: int | BatchSchedule,
                seq_length: int) -> list[StagePlan]:
    """The stages that fall inside ``train_steps``, with token starts converted to steps."""
    if train_steps < 1:
        raise ConfigError(f"training.train_steps must be >= 1, got {train_steps}")
    batch = (global_batch_size if isinstance(global_batch_size, BatchSchedule)
             else BatchSchedule(global_batch_size))
    starts: list[int] = []
    tokens_before, step_before, length_before = 0, 1, None
    for stage in recipe.stages:
        length = stage.seq_length or seq_length
        if stage.start_step is not None:
            start = stage.start_step
        else:
            # Tokens trained before this stage accrue at the previous stage's sequence length.
            missing = max(0, stage.start_tokens - tokens_before)
            sequences = math.ceil(missing / (length_before or length))
            start = step_before + batch.steps_to_draw(step_before, sequences)
        if starts and start <= starts[-1]:
            raise ConfigError(f"recipe {recipe.name}: stage {stage.name} resolves to step {start}, "
                              "not after the previous stage")
        if starts:
            drawn = batch.samples_through(start - 1) - batch.samples_through(starts[-1] - 1)
            tokens_before += drawn * length_before
        starts.append(start)
        step_before, length_before = start, length
    plans = []
    for index, (stage, start) in enumerate(zip(recipe.stages, starts)):
        if start > train_steps:
            break
        end = starts[index + 1] - 1 if index + 1 < len(starts) else train_steps
        plans.append(StagePlan(index, stage, start, min(end, train_steps),
                               stage.seq_length or seq_length, batch))
    return plans


def stage_for_step(plans: list[StagePlan], step: int) -> StagePlan:
    for plan in plans:
        if plan.first_step <= step <= plan.last_step:
            return plan
    raise ValueError(f"step {step} is outside the planned stages "
                     f"({plans[0].first_step}..{plans[-1].last_step})")
