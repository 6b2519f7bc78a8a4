"""What a micro-batch's forward output is turned into: the loss Megatron-Core's schedule
back-propagates, the count it divides gradients by, and the metric sums the step reports.

The model returns the per-token loss (cross-entropy from the vocabulary-parallel logits, never
gathering the vocabulary; plus the z-loss term when the spec asks for it). Two objectives:

* :class:`TokenLoss` -- next-token prediction (pretraining, mid-training, SFT): the summed
  per-token loss under the loss mask, divided by the global number of loss tokens;
* :class:`PreferenceLoss` -- DPO / IPO / APO on packed preference pairs: per-document
  log-probabilities (minus the per-token CE summed over each completion), reduced over the
  context-parallel group before the loss, then the pair loss of TRL's ``DPOTrainer``, divided
  by the global number of pairs.

Each returns ``(loss, count, {"loss": [loss_sum, count], "metrics": [...]})``: sums, so a step's
totals do not depend on how the global batch is split over micro-batches or ranks.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from megasmol.config.preference import PreferenceConfig
from megasmol.data.masking import ModelInputs


class TokenLoss:
    """Token-weighted mean of the per-token loss over the global batch."""

    metric_names: tuple[str, ...] = ()
    unit = "tokens"

    def __call__(self, inputs: ModelInputs, output_tensor: Tensor):
        mask = inputs.loss_mask.reshape(-1).float()
        loss_sum = torch.sum(output_tensor.float().reshape(-1) * mask)
        tokens = mask.sum().to(torch.int)
        return loss_sum, tokens, {"loss": torch.stack([loss_sum.detach(), tokens.detach().float()])}

    def means(self, sums: list[float], count: float) -> dict[str, float]:
        return {}


def segment_sums(inputs: ModelInputs, output_tensor: Tensor, with_grad: bool = True) -> Tensor:
    """[3, slots] per document of the micro-batch: policy log-prob, reference log-prob and label
    count, summed over its completion tokens and over the context-parallel group (the policy
    row with autograd, so each rank's tokens get the gradient of the whole document)."""
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()
    segments = inputs.segments.reshape(-1)
    mask = inputs.loss_mask.reshape(-1).to(torch.float64) * (segments >= 0)
    index = segments.clamp(min=0)
    slots = segments.numel() * cp  # ids are below the micro-batch's whole [b * s] length
    slots += slots % 2  # chosen and rejected slots side by side
    logp = -output_tensor.reshape(-1).to(torch.float64) * mask
    policy = torch.zeros(slots, dtype=torch.float64, device=logp.device).index_add(0, index, logp)
    with torch.no_grad():
        ref = torch.zeros_like(policy).index_add(0, index, inputs.ref_logps.reshape(-1) * mask)
        count = torch.zeros_like(policy).index_add(0, index, mask)
    sums = torch.stack([policy if with_grad else policy.detach(), ref, count])
    if cp > 1:
        from torch.distributed.nn.functional import all_reduce

        sums = all_reduce(sums, group=parallel_state.get_context_parallel_group())
    return sums


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

    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected", "nll/chosen")
    unit = "pairs"

    def __init__(self, config: PreferenceConfig):
        self.config = config

    def __call__(self, inputs: ModelInputs, output_tensor: Tensor):
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

    def means(self, sums: list[float], count: float) -> dict[str, float]:
        if count <= 0:
            return {}
        return {name: value / count for name, value in zip(self.metric_names, sums)}


def document_logps(inputs: ModelInputs, output_tensor: Tensor):
    """Forward-only loss function: each document's summed completion log-prob (the reference
    pass); reported by context-parallel rank 0 only."""
    from megatron.core import parallel_state

    sums = segment_sums(inputs, output_tensor, with_grad=False)
    if parallel_state.get_context_parallel_rank() != 0:
        sums = torch.zeros_like(sums)
    zero = sums.new_zeros(())
    return zero, torch.tensor(0, dtype=torch.int), {"logps": sums[0], "count": sums[2]}
