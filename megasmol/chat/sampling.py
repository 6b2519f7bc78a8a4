"""Next-token choice: greedy, or temperature with nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megasmol.config.typed import ConfigError


@dataclass
class Sampling:
    temperature: float = 0.0
    """0: greedy (argmax); above 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p."""
    seed: Optional[int] = None
    """Seed for reproducible sampling."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generator(self) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)

    def choose(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[1, vocab] logits -> [1, 1] token id."""
        logits = logits.float()
        if self.temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)
