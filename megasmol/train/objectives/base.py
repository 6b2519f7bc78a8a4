"""What an objective is: the protocol the step calls on every micro-batch's output, and the one
a run's set-up calls to check its data and build it.

A run trains one objective, chosen by ``training.objective`` (:mod:`registry` maps the name to
its :class:`ObjectiveKind`). An objective returns sums, so a step's totals do not depend on how
the global batch is split over micro-batches or ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.data.masking import ModelInputs
    from megasmol.data.recipe import DataRecipe, StagePlan
    from megasmol.model.spec import ModelSpec
    from megasmol.train.setup import Batches, TrainingSetup

LossReport = tuple[Tensor, Tensor, dict[str, Tensor]]
"""``(loss, count, {"loss": [loss_sum, count], "metrics": [...]})``: what Megatron-Core's schedule
back-propagates (``loss``), the count it divides gradients by, and the sums the step reports."""


class Objective(Protocol):
    """Turns a micro-batch's per-token model output into a loss (Megatron-Core's ``loss_func``)."""

    metric_names: tuple[str, ...]
    """The extra metric sums it reports, in order (``rewards/margins``...); empty for none."""
    unit: str
    """What ``count`` counts (``tokens``, ``pairs``): the step's log line names it."""
    scored_only: bool
    """True: the loss reads the per-token output only where the loss mask counts, so the training
    forward runs the output layer at those positions only (``forward_step``'s ``scored_only``)."""

    def __call__(self, inputs: ModelInputs, output_tensor: Tensor) -> LossReport: ...

    def token_weights(self, inputs: ModelInputs) -> Optional[Tensor]:
        """``w`` ([b, s]) when the differentiable loss is ``sum(w * output_tensor)`` with ``w``
        known before the forward (the chunked output layer then computes its gradients in the
        forward); None when the loss is not linear in the per-token output."""
        ...

    def means(self, sums: list[float], count: float) -> dict[str, float]:
        """The metrics averaged over the global batch, from their all-reduced sums."""
        ...


class ObjectiveKind(Protocol):
    """One choice of ``training.objective``: the data it trains on and how a run sets it up."""

    name: str
    """Its ``training.objective`` value."""
    data: str
    """The data it trains on, in words for errors (with the command that prepares them)."""

    def takes(self, prefix: Path) -> bool:
        """Whether the dataset at ``prefix`` is data this objective trains on."""
        ...

    def check(self, config: RunConfig, needed: bool) -> None:
        """Before anything heavy: what else the objective needs from the config (a ConfigError
        naming the field). ``needed=False``: a pre-flight's timed steps (no reference model)."""
        ...

    def batches(self, config: RunConfig, recipe: DataRecipe, plans: list[StagePlan], spec: ModelSpec,
                dp_rank: int, dp: int) -> Batches:
        """This data-parallel rank's batch source for the planned stages (collective): the
        recipe's datasets (``setup.recipe_batches``), or what the objective makes itself."""
        ...

    def build(self, setup: TrainingSetup, *, resuming: bool, needed: bool) -> Objective:
        """The objective for the built ``setup`` (collective: it may score the data first)."""
        ...


class RecipeData:
    """For objectives that train on the data recipe's datasets: their batches."""

    def batches(self, config: RunConfig, recipe: DataRecipe, plans: list[StagePlan], spec: ModelSpec,
                dp_rank: int, dp: int) -> Batches:
        from megasmol.data.loader import recipe_batches

        return recipe_batches(config, recipe, plans, spec, dp_rank, dp)
