"""A preference prefix as packing units: each pair (prompt+chosen, prompt+rejected) is one unit,
so first-fit-decreasing packing places both halves in the same sequence and never splits a pair.

:class:`~megasmol.data.chat.dataset.SequenceDataset` packs these units like conversations; this
module says what a unit is made of and what the packed sample carries besides tokens: each
label's pair slot and half (``segments``) and each half's reference log-probability
(``ref_logps``, from :mod:`megasmol.train.reference`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from megasmol.config.typed import ConfigError
from megasmol.data.chat.prepare import open_masked_documents
from megasmol.data.preference.prepare import read_pref_description


class PairTokens:
    """A preference prefix's tokens and completion masks (two sequences per pair)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.description = read_pref_description(prefix)
        self.tokens, self.mask = open_masked_documents(prefix, "preference", "prepare-preferences")
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


def mark_pair(segments: np.ndarray, ref: np.ndarray, at: int, half: int, slot: int,
              mask: np.ndarray, reference: Optional[np.ndarray], pair: int) -> None:
    """Label the tokens of one half placed at ``at`` (token positions; labels are shifted by one
    later) and hold its reference log-prob at its last completion token."""
    segments[at:at + len(mask)] = 2 * slot + half
    if reference is not None:
        last = at + int(np.flatnonzero(mask)[-1])
        ref[last] = reference[pair, half]
