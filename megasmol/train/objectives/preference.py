"""Preference optimization on packed pairs (DPO / IPO / APO): ``training.objective: preference``.

:class:`PreferenceLoss` turns per-document log-probabilities (minus the per-token CE summed over
each completion), reduced over the context-parallel group before the loss, into the pair loss of
TRL's ``DPOTrainer``, divided by the global number of pairs. The per-token output must be plain
CE (no z-loss): the set-up turns it off for the run (``model.gpt.plain_cross_entropy``) and
attaches every pair's reference log-probs to the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from megasmol.config.preference import PreferenceConfig
from megasmol.config.typed import ConfigError
from megasmol.train.objectives.base import LossReport, RecipeData
from megasmol.train.objectives.segments import segment_sums

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.data.masking import ModelInputs
    from megasmol.train.setup import TrainingSetup


def pair_losses(loss_type: str, beta: float, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor,
                ref_rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
    """Per-pair losses, as TRL's ``DPOTrainer`` defines them (label smoothing 0)."""
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":  # length-normalized log-ratios (TRL, confirmed with IPO's authors)
        delta = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":
        margin = chosen_ratio - rejected_ratio
        return torch.sigmoid(beta * chosen_ratio) + (1 - torch.sigmoid(beta * margin))
    raise ValueError(f"unknown preference loss {loss_type!r}")


class PreferenceLoss:
    """Pair losses summed over the micro-batch's pairs; gradients divided by the global pair count.

    Every context-parallel rank computes the same pair losses from the reduced sums; only rank 0
    of the group reports them (loss, count and metrics), the others return the loss times zero,
    which keeps them in the backward all-reduce of the sums.
    """

    metric_names: tuple[str, ...] = ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                     "rewards/margins", "logps/chosen", "logps/rejected", "nll/chosen")
    unit = "pairs"
    scored_only = False

    def __init__(self, config: PreferenceConfig):
        self.config = config

    def __call__(self, inputs: ModelInputs, output_tensor: Tensor) -> LossReport:
        from megatron.core import parallel_state

        sums = segment_sums(inputs, output_tensor)
        policy, ref, count = sums[0], sums[1], sums[2]
        present = (count[0::2] > 0) & (count[1::2] > 0)
        chosen, rejected = policy[0::2][present], policy[1::2][present]
        ref_chosen, ref_rejected = ref[0::2][present], ref[1::2][present]
        n_chosen, n_rejected = count[0::2][present], count[1::2][present]
        cfg = self.config
        losses = pair_losses(cfg.loss_type, cfg.beta, chosen, rejected, ref_chosen, ref_rejected,
                             n_chosen, n_rejected)
        nll = -chosen / n_chosen.clamp(min=1)
        if cfg.sft_weight:
            losses = losses + cfg.sft_weight * nll
        loss_sum = losses.sum()
        reporting = parallel_state.get_context_parallel_rank() == 0
        pairs = torch.tensor(int(present.sum()) if reporting else 0, dtype=torch.int)
        if not reporting:
            loss_sum = loss_sum * 0.0
        with torch.no_grad():
            reward_c = cfg.beta * (chosen - ref_chosen)
            reward_r = cfg.beta * (rejected - ref_rejected)
            metrics = torch.stack([reward_c.sum(), reward_r.sum(), (reward_c > reward_r).double().sum(),
                                   (reward_c - reward_r).sum(), chosen.sum(), rejected.sum(), nll.sum()])
            if not reporting:
                metrics = torch.zeros_like(metrics)
        report = torch.stack([loss_sum.detach().double(), pairs.double()])
        return loss_sum, pairs, {"loss": report, "metrics": metrics.detach()}

    def token_weights(self, inputs: ModelInputs) -> None:
        """None: the pair loss is not linear in the per-token log-probs."""
        return None

    def means(self, sums: list[float], count: float) -> dict[str, float]:
        if count <= 0:
            return {}
        return {name: value / count for name, value in zip(self.metric_names, sums)}


class Preference(RecipeData):
    """Preference pairs (``prepare-preferences``), scored against a reference model."""

    name = "preference"
    data = "preference pairs (`megasmol prepare-preferences` output)"

    def takes(self, prefix: Path) -> bool:
        from megasmol.data.preference.prepare import read_pref_description

        return read_pref_description(prefix) is not None

    def check(self, config: RunConfig, needed: bool) -> None:
        if needed and reference_checkpoint(config) is None:
            raise ConfigError("preference data need a reference model: set checkpoint.init_from (the "
                              "SFT checkpoint, also the default reference) or preference.reference")

    def build(self, setup: TrainingSetup, *, resuming: bool, needed: bool) -> PreferenceLoss:
        """Plain CE for the run, then (when ``needed``) every pair's reference log-probs attached
        to the data; without them (pre-flight) pairs train against zero reference log-probs."""
        from megasmol.model.gpt import plain_cross_entropy
        from megasmol.train.reference import attach_reference_logps
        from megasmol.utils.fs import shown_paths

        config = setup.config
        setup.hold(plain_cross_entropy(setup.model))
        reference = reference_checkpoint(config)
        if needed and reference is not None:
            init_from = config.checkpoint.init_from and config.path(config.checkpoint.init_from)
            restore = init_from if (not resuming and init_from and init_from != reference) else None
            attach_reference_logps(setup, reference, weights_after=restore,
                                   show_progress=config.logging.progress,
                                   say=lambda line: print(shown_paths(line), flush=True))
        return PreferenceLoss(config.preference)


def reference_checkpoint(config: RunConfig) -> Path | None:
    """``preference.reference``, else ``checkpoint.init_from`` (the SFT checkpoint)."""
    source = config.preference.reference or config.checkpoint.init_from
    return None if source is None else config.path(source)
