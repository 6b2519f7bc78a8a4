"""What greedy generation has done so far: prompts finished, tokens generated, tokens per second
and generations cut at the token limit, counted for the caller and shown on a progress bar.

Generation is the slow part of an evaluation on a CPU (a model that never writes a stop string
decodes every prompt to ``max_gen_tokens``), so it gets its own bar, advanced by every decoding
step rather than by whole batches:
``generate humaneval:  35%|###  | 7/20 [01:10<02:10, 3,410 tok, 48.7 tok/s, 7 truncated]``.
"""

from __future__ import annotations

import time
from typing import Optional


class GenerationProgress:
    """``bar``: a tqdm bar (total: the prompts) or None to count without showing."""

    REFRESH_S = 0.5
    """Shortest time between two redraws of the tokens/s figure."""

    def __init__(self, bar=None, total: Optional[int] = None):
        self.bar = bar
        self.total = total if total is not None else getattr(bar, "total", None)
        self.prompts = self.tokens = self.steps = self.truncated = 0
        self.started = self._shown = time.monotonic()

    def task(self, label: str) -> None:
        """The task(s) whose prompts are being decoded now."""
        if self.bar is not None:
            self.bar.set_description(f"generate {label}" if label else "generate", refresh=False)

    def step(self, tokens: int, finished: int = 0) -> None:
        """One decoding step: ``tokens`` new ids over the batch, ``finished`` rows done with it."""
        self.steps += 1
        self.tokens += tokens
        self.done(finished)

    def done(self, prompts: int, truncated: int = 0) -> None:
        """``prompts`` more generations finished (``truncated`` of them cut at the limit)."""
        if self.total is not None:
            prompts = max(0, min(prompts, self.total - self.prompts))
        self.prompts += prompts
        self.truncated += truncated
        if self.bar is None:
            return
        now = time.monotonic()
        if prompts or truncated or now - self._shown >= self.REFRESH_S:
            self._shown = now
            self.bar.set_postfix_str(self.summary(), refresh=False)
            if prompts:
                self.bar.update(prompts)
            else:
                self.bar.refresh()

    def finish(self) -> None:
        """Every prompt is done (the batched paths may report rows in bulk at the end)."""
        if self.total is not None:
            self.done(self.total - self.prompts)

    def rate(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def summary(self) -> str:
        text = f"{self.tokens:,} tok, {self.rate():.1f} tok/s"
        return text + (f", {self.truncated} truncated" if self.truncated else "")
