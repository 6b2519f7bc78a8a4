"""Completions packed as documents: the rows one update trains on.

Each completion becomes one document, its prompt followed by the completion and, when the
completion did not end with the model's EOS (it was cut at ``max_completion_length`` or ended at a
stop string), the EOS that closes every packed document. Documents are packed first-fit-decreasing
into rows of ``seq_length + 1`` tokens (the packing of chat and preference data,
``data.masked.packing``), never split, with positions restarting at each document. The loss mask
covers the completion's tokens only (the closing EOS added here is not one of them); each label
carries the completion's index (``segments``, as preference pairs do), its advantage, the
log-prob the decoder sampled it with and the entropy of the distribution it was sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from megasmol.data.masked.packing import first_fit_decreasing


@dataclass
class PackedCompletion:
    """One completion as the packer takes it."""

    prompt: list[int]
    completion: list[int]
    rollout_logps: list[float]
    """The decoder's log-prob of each completion token."""
    advantage: float
    trained: bool = True
    """False: the completion's tokens get no loss (``rewards.mask_truncated_completions``)."""
    entropies: list[float] = field(default_factory=list)
    """The entropy of the decoder's distribution at each completion token (empty: not known,
    no ``rollout_entropies`` field)."""


def document(item: PackedCompletion, eod: int) -> list[int]:
    ids = item.prompt + item.completion
    return ids if item.completion and item.completion[-1] == eod else ids + [eod]


def pack_rows(items: list[PackedCompletion], seq_length: int, eod: int, pad: Optional[int] = None,
              rows_per_micro: int = 1, at_least_one: bool = False) -> list[dict]:
    """Micro-batches (collated ``[rows, seq_length]`` tensors) holding every completion once;
    ``at_least_one``: one micro-batch of padding (no loss) when there is no completion."""
    capacity = seq_length + 1
    docs = [document(item, eod) for item in items]
    for index, doc in enumerate(docs):
        if len(doc) > capacity:
            raise ValueError(f"completion {index}: prompt and completion take {len(doc)} tokens, "
                             f"more than a row's {capacity} (data.seq_length + 1)")
    bins = first_fit_decreasing(np.array([len(d) for d in docs]), capacity) if docs else []
    entropies = bool(items) and all(len(item.entropies) == len(item.completion) for item in items)
    rows = [_row(bin_, items, docs, capacity, eod, eod if pad is None else pad, entropies) for bin_ in bins]
    while len(rows) % rows_per_micro or (at_least_one and not rows):
        rows.append(_row([], items, docs, capacity, eod, eod if pad is None else pad, entropies))
    return [{key: torch.stack([r[key] for r in rows[at:at + rows_per_micro]]) for key in rows[0]}
            for at in range(0, len(rows), rows_per_micro)]


def _row(members: list[int], items: list[PackedCompletion], docs: list[list[int]], capacity: int,
         eod: int, pad: int, entropies: bool) -> dict:
    tokens = np.full(capacity, pad, dtype=np.int64)
    mask = np.zeros(capacity, dtype=np.float32)
    positions = np.zeros(capacity, dtype=np.int64)
    segments = np.full(capacity, -1, dtype=np.int64)
    rollout = np.zeros(capacity, dtype=np.float64)
    entropy = np.zeros(capacity, dtype=np.float64)
    advantage = np.zeros(capacity, dtype=np.float64)
    at = 0
    for index in members:
        item, doc = items[index], docs[index]
        n, start = len(doc), at + len(item.prompt)
        end = start + len(item.completion)
        tokens[at:at + n] = doc
        positions[at:at + n] = np.arange(n)
        if item.trained:
            mask[start:end] = 1.0
        segments[start:end] = index
        rollout[start:end] = item.rollout_logps
        if entropies:
            entropy[start:end] = item.entropies
        advantage[start:end] = item.advantage
        at += n
    positions[at:] = np.arange(capacity - at)
    inputs = torch.from_numpy(tokens[:-1].copy())
    row = {"tokens": inputs, "labels": torch.from_numpy(tokens[1:].copy()),
           "loss_mask": torch.from_numpy(mask[1:].copy()),
           "position_ids": torch.from_numpy(positions[:-1].copy()),
           "segments": torch.from_numpy(segments[1:].copy()),
           "rollout_logps": torch.from_numpy(rollout[1:].copy()),
           "advantages": torch.from_numpy(advantage[1:].copy())}
    if entropies:
        row["rollout_entropies"] = torch.from_numpy(entropy[1:].copy())
    return row
