"""Next-token prediction (pretraining, mid-training, SFT): ``training.objective: next_token``.

The model returns the per-token loss (cross-entropy from the vocabulary-parallel logits, never
gathering the vocabulary; plus the z-loss term when the spec asks for it); the objective sums it
under the loss mask, and Megatron-Core divides the gradients by the global number of loss tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megasmol.train.objectives.base import LossReport, RecipeData

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.data.masking import ModelInputs
    from megasmol.train.setup import TrainingSetup


class TokenLoss:
    """Token-weighted mean of the per-token loss over the global batch."""

    metric_names: tuple[str, ...] = ()
    unit = "tokens"
    scored_only = False

    def __call__(self, inputs: ModelInputs, output_tensor: Tensor) -> LossReport:
        mask = inputs.loss_mask.reshape(-1).float()
        loss_sum = torch.sum(output_tensor.float().reshape(-1) * mask)
        tokens = mask.sum().to(torch.int)
        return loss_sum, tokens, {"loss": torch.stack([loss_sum.detach(), tokens.detach().float()])}

    def token_weights(self, inputs: ModelInputs) -> Tensor:
        """The loss mask: the loss is the masked sum of the per-token output."""
        return inputs.loss_mask.float()

    def means(self, sums: list[float], count: float) -> dict[str, float]:
        return {}


class NextToken(RecipeData):
    """Token data (``prepare-data``) and chat data (``prepare-chat``)."""

    name = "next_token"
    data = "token or chat data (`megasmol prepare-data` or `prepare-chat` output)"

    def takes(self, prefix: Path) -> bool:
        from megasmol.data.preference.prepare import read_pref_description

        return read_pref_description(prefix) is None

    def check(self, config: RunConfig, needed: bool) -> None:
        pass

    def build(self, setup: TrainingSetup, *, resuming: bool, needed: bool) -> TokenLoss:
        return TokenLoss()
