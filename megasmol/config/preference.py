"""The ``preference:`` run-config section: the loss of ``training.objective: preference``, whose
data are preference pairs (``prepare-preferences`` output). Names and formulas are TRL's
``DPOTrainer``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megasmol.config.typed import PATH, ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "apo_zero", "apo_down")


@dataclass
class PreferenceConfig:
    """How preference pairs are turned into a loss (``training.objective: preference``)."""

    loss_type: Literal["sigmoid", "ipo", "apo_zero", "apo_down"] = "sigmoid"
    """sigmoid: DPO, -log sigma(beta (r_c - r_r)); ipo: IPO on per-token mean log-ratios,
    ((r_c/n_c - r_r/n_r) - 1/(2 beta))^2; apo_zero: APO-zero (SmolLM3), (1 - sigma(beta r_c)) +
    sigma(beta r_r), for chosen answers better than the model's own; apo_down: APO-down,
    sigma(beta r_c) + 1 - sigma(beta (r_c - r_r)). r = policy minus reference log-probability of
    a completion, summed over its tokens."""
    beta: float = 0.1
    """Strength of the tie to the reference model (SmolLM3's playbook sweep: 0.1 best; the
    released APO config used 0.05; explore 0.01-0.5)."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen completion (RPO-style): per pair, the chosen
    completion's mean token NLL, averaged over pairs (0: none)."""
    reference: Optional[str] = field(default=None, metadata=PATH)
    """Reference checkpoint (root or iteration directory) whose log-probs are precomputed once per
    dataset (default: ``checkpoint.init_from``, the SFT checkpoint)."""

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"preference.beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError(f"preference.sft_weight must be >= 0, got {self.sft_weight}")
