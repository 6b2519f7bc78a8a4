"""The output layer and the log-softmax over the continuation positions only: ``LogProbs``
applies the output layer (``LinearInto``) in slices of ``HEAD_POSITIONS`` positions written into
one reused buffer, and picks each target's log-probability. Every scorer's last step."""

from __future__ import annotations

from typing import Optional

import torch


class LogProbs:
    """log p(target) at each row of hidden states: the output layer in slices of positions, each
    written into the same [slice, vocab] buffer (a whole batch's logits would be gigabytes; a
    fresh slice each time, 128 MB for a 128k vocabulary, cost a page fault per 4 KiB on a CPU).
    log p = logit - logsumexp(logits), the log-sum-exp in place."""

    def __init__(self, head: LinearInto):
        self.head = head
        self._logits: Optional[torch.Tensor] = None

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        picked = torch.empty(len(targets), dtype=torch.float64)
        for start in range(0, len(targets), HEAD_POSITIONS):
            states = hidden[start:start + HEAD_POSITIONS]
            if self._logits is None:  # one buffer for every slice (the head's shape and dtype)
                weight = self.head.weight
                self._logits = torch.empty(HEAD_POSITIONS, weight.shape[0], dtype=weight.dtype,
                                           device=weight.device)
            logits = self.head(states, self._logits[:len(states)]).float()
            chosen = targets[start:start + len(states), None].to(logits.device)
            picked[start:start + len(states)] = (logits.gather(-1, chosen).squeeze(-1)
                                                 - logsumexp_(logits)).double()
        return picked


def logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, -1)``, bit for bit (the same operations in the same order), with
    ``logits`` itself as the scratch space: its values are overwritten."""
    peak = logits.amax(-1, keepdim=True)
    peak.masked_fill_(peak.abs() == float("inf"), 0)
    return logits.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(-1))


class LinearInto:
    """The output layer, ``states @ weight.T (+ bias)``, written into a buffer the caller keeps."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        self.weight, self.bias = weight, bias

    def __call__(self, states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.mm(states, self.weight.t(), out=out)
        return torch.addmm(self.bias, states, self.weight.t(), out=out)


HEAD_POSITIONS = 256
"""Positions per output-layer call while scoring (x the vocabulary: 128 MB of fp32 logits for
SmolLM3's 128k)."""
