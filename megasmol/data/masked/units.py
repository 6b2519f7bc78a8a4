"""Packing units: what :class:`~megasmol.data.masked.dataset.SequenceDataset` places whole into a
training sequence.

* :class:`ChatTokens` -- a chat prefix (``prepare-chat``): one conversation per unit;
* :class:`PairTokens` -- a preference prefix (``prepare-preferences``): each pair
  (prompt+chosen, prompt+rejected) is one unit, so first-fit-decreasing packing places both
  halves in the same sequence and never splits a pair. A packed sample of pairs carries besides
  tokens each label's pair slot and half (``segments``) and each half's reference
  log-probability (``ref_logps``, from :mod:`megasmol.train.reference`), see :func:`mark_pair`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.masked.descriptions import CHAT, PREFERENCE
from megasmol.data.masked.reader import open_masked_documents


class ChatTokens:
    """A chat prefix's tokens and aligned loss mask, both Megatron ``IndexedDataset``s."""

    noun = "conversations"
    """What the packing log and summary count."""
    oversize = "conversation(s)"
    """What is too long for a sequence."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.description = CHAT.read(prefix)
        self.tokens, self.mask = open_masked_documents(prefix, CHAT)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths

    def documents(self, conversation: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.tokens[conversation], self.mask[conversation])]


class PairTokens:
    """A preference prefix's tokens and completion masks (two sequences per pair)."""

    noun = "pairs"
    oversize = "pair(s) (both halves)"

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.description = PREFERENCE.read(prefix)
        self.tokens, self.mask = open_masked_documents(prefix, PREFERENCE)
        halves = self.tokens.sequence_lengths
        if len(halves) % 2 or len(self.tokens.document_indices) != len(halves) // 2 + 1:
            raise ConfigError(f"preference dataset {prefix}: not two sequences per pair; prepare it "
                              "again with prepare-preferences")
        self.pair_lengths = (halves[0::2].astype(np.int64) + halves[1::2])
        self.reference: Optional[np.ndarray] = None
        """[pairs, 2] reference log-probs (chosen, rejected), attached before training."""

    @property
    def sequence_lengths(self) -> np.ndarray:
        """Packing units are pairs: each pair's two halves together."""
        return self.pair_lengths

    @property
    def num_pairs(self) -> int:
        return len(self.pair_lengths)

    def documents(self, pair: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.tokens[2 * pair + h], self.mask[2 * pair + h]) for h in (0, 1)]


UNITS = {CHAT: ChatTokens, PREFERENCE: PairTokens}
"""The packing unit of each kind of masked-documents data."""
PACKED_UNITS = tuple(UNITS.values())


def mark_pair(segments: np.ndarray, ref: np.ndarray, at: int, half: int, slot: int,
              mask: np.ndarray, reference: Optional[np.ndarray], pair: int) -> None:
    """Label the tokens of one half placed at ``at`` (token positions; labels are shifted by one
    later) and hold its reference log-prob at its last completion token."""
    segments[at:at + len(mask)] = 2 * slot + half
    if reference is not None:
        last = at + int(np.flatnonzero(mask)[-1])
        ref[last] = reference[pair, half]
