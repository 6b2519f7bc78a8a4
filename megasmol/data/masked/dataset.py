"""One Megatron-Core dataset class for plain token data and masked documents (chat, preference
pairs), so a recipe can mix them.

Megatron-Core's ``BlendedDataset`` requires every blended dataset to be of one type, so
:class:`SequenceDataset` is a ``GPTDataset`` that, for a prefix with a description
(:mod:`descriptions`: ``.chat.json`` from ``prepare-chat``, ``.pref.json`` from
``prepare-preferences``), builds packed sequences instead:

* the low-level dataset is the token ``IndexedDataset`` plus its aligned loss-mask one, read as
  packing units (:mod:`units`: conversations, or preference pairs);
* the split's units are packed once (:mod:`packing`), the plan and the sample order (a fresh
  permutation of the packed sequences per epoch, from the seed) cached beside Megatron's own
  indices;
* each sample holds whole units, each document ending in EOS (so document masking keeps
  attention inside each), positions restarting per document, padding after the last; the
  loss mask is the prepared one (assistant tokens, completions, or all), never the prediction
  from an EOS and never padding.

Plain prefixes behave exactly as ``GPTDataset``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset

from megasmol.config.typed import ConfigError
from megasmol.data.masked.descriptions import describe
from megasmol.data.masked.packing import PackingPlan, plan_packing
from megasmol.data.masked.units import PACKED_UNITS, UNITS, PairTokens, mark_pair
from megasmol.utils.fs import atomic_save_npy

log = logging.getLogger(__name__)


@dataclass
class SequenceDatasetConfig(GPTDatasetConfig):
    packing: str = "ffd"
    """How chat conversations fill sequences: ffd or none (one per sequence)."""


class SequenceDataset(GPTDataset):
    """``GPTDataset`` for plain prefixes; packed units for chat and preference prefixes."""

    def __init__(self, low_level, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split, config: SequenceDatasetConfig) -> None:
        if not isinstance(low_level, PACKED_UNITS):
            super().__init__(low_level, dataset_path, indices, num_samples, index_split, config)
            self.plan = None
            return
        MegatronDataset.__init__(self, low_level, dataset_path, indices, num_samples, index_split, config)
        self.plan, self.sample_order = self._load_or_build_plan()

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig):
        described = describe(dataset_path)
        if described is not None:
            return UNITS[described[0]](dataset_path)
        return GPTDataset.build_low_level_dataset(dataset_path, config)

    @staticmethod
    def numel_low_level_dataset(low_level) -> int:
        return low_level.sequence_lengths.shape[0]

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return GPTDataset._key_config_attributes() + ["packing"]

    # ---- chat ------------------------------------------------------------------------------

    def _cache_paths(self) -> dict[str, Path]:
        root = Path(self.config.path_to_cache)
        stem = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        return {k: root / f"{stem}-{k}.npy" for k in ("order", "bounds", "samples")}

    def _load_or_build_plan(self) -> tuple[PackingPlan, np.ndarray]:
        capacity = self.config.sequence_length + 1
        lengths = self.dataset.sequence_lengths[self.indices].astype(np.int64)
        paths = self._cache_paths()
        if all(p.is_file() for p in paths.values()):
            arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
            plan = PackingPlan(arrays["order"], arrays["bounds"], capacity, int(lengths.sum()))
            return plan, arrays["samples"]
        too_long = np.flatnonzero(lengths > capacity)
        if too_long.size:
            raise ConfigError(
                f"dataset {self.dataset_path}: {too_long.size} {self.dataset.oversize} are longer than "
                "a sequence "
                f"(longest {int(lengths.max())} tokens > data.seq_length + 1 = {capacity}); "
                "prepare it with --max-length (truncate or drop) or raise data.seq_length")
        plan = plan_packing(lengths, capacity, self.config.packing)
        wanted = self.num_samples if self.num_samples is not None else plan.num_sequences
        epochs = -(-wanted // max(1, plan.num_sequences)) if plan.num_sequences else 0
        rng = np.random.RandomState(self.config.random_seed)
        samples = (np.concatenate([rng.permutation(plan.num_sequences) for _ in range(epochs)])[:wanted]
                   if epochs else np.zeros(0, dtype=np.int64))
        Path(self.config.path_to_cache).mkdir(parents=True, exist_ok=True)
        for key, array in (("order", plan.order), ("bounds", plan.bounds), ("samples", samples)):
            atomic_save_npy(paths[key], array.astype(np.int64))  # every rank may build it at once
        log.info("packed %s (%s): %d %s into %d sequences of %d tokens, %.1f%% filled "
                 "(packing %s), %d samples = %.2f passes over those sequences (the audit's epochs "
                 "count tokens, padding included)", self.dataset_path, self.index_split.name,
                 len(lengths), self.dataset.noun,
                 plan.num_sequences, capacity - 1, 100 * plan.efficiency,
                 self.config.packing, len(samples), len(samples) / max(1, plan.num_sequences))
        return plan, samples

    def __len__(self) -> int:
        if self.plan is None:
            return super().__len__()
        return len(self.sample_order)

    def __getitem__(self, idx):
        if self.plan is None:
            return super().__getitem__(idx)
        return self.packed_sample(int(self.sample_order[idx]))

    def packed_sample(self, sequence: int) -> dict:
        """Tokens, labels, loss mask and restarted positions of one packed sequence; for
        preference pairs also each label's ``segments`` and the halves' ``ref_logps``."""
        plan, low = self.plan, self.dataset
        members = plan.order[plan.bounds[sequence]:plan.bounds[sequence + 1]]
        eod = self.config.tokenizer.eod
        pad = self.config.tokenizer.pad if self.config.tokenizer.pad >= 0 else eod
        tokens = np.full(plan.capacity, pad, dtype=np.int64)
        mask = np.zeros(plan.capacity, dtype=np.float32)
        positions = np.zeros(plan.capacity, dtype=np.int64)
        pairs = isinstance(low, PairTokens)
        if pairs:
            segments = np.full(plan.capacity, -1, dtype=np.int64)
            ref = np.zeros(plan.capacity, dtype=np.float64)
        at = 0
        for slot, member in enumerate(members):
            unit = int(self.indices[member])
            for half, (ids, doc_mask) in enumerate(low.documents(unit)):
                n = len(ids)
                tokens[at:at + n] = ids
                mask[at:at + n] = doc_mask
                positions[at:at + n] = np.arange(n)
                if pairs:
                    mark_pair(segments, ref, at, half, slot, doc_mask, low.reference, unit)
                at += n
        positions[at:] = np.arange(plan.capacity - at)
        inputs = torch.from_numpy(tokens[:-1].copy())
        loss_mask = torch.from_numpy(mask[1:].copy())
        loss_mask[inputs == eod] = 0.0  # the token after an EOS belongs to another conversation
        sample = {"tokens": inputs, "labels": torch.from_numpy(tokens[1:].copy()),
                  "loss_mask": loss_mask, "position_ids": torch.from_numpy(positions[:-1].copy())}
        if pairs:
            sample["segments"] = torch.from_numpy(segments[1:].copy())
            sample["ref_logps"] = torch.from_numpy(ref[1:].copy())
        return sample


def open_chat_dataset(prefix: str | Path, seq_length: int, token_ids, *, packing: str = "ffd",
                      cache_dir: str | Path, seed: int = 1234) -> SequenceDataset:
    """Every conversation of a chat prefix, packed once (one epoch, in packing order): for
    evaluation and tests, outside a training recipe."""
    from megatron.core.datasets.utils import Split

    config = SequenceDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([str(prefix)], None), split="100,0,0",
        path_to_cache=str(cache_dir), tokenizer=token_ids, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=True, create_attention_mask=False, packing=packing)
    low = SequenceDataset.build_low_level_dataset(str(prefix), config)
    if not isinstance(low, PACKED_UNITS):
        raise ConfigError(f"{prefix}: not a chat or preference dataset (no {prefix}.chat.json or "
                          f"{prefix}.pref.json)")
    count = len(low.sequence_lengths)
    return SequenceDataset(low, str(prefix), np.arange(count, dtype=np.int64), None, Split.train, config)


def chat_tokenizer_dir(prefixes: list[str]) -> Optional[Path]:
    """The tokenizer stored with the first chat or preference dataset among ``prefixes`` (None:
    none)."""
    for prefix in prefixes:
        described = describe(prefix)
        if described is not None:
            path = Path(prefix).parent / described[1]["tokenizer_dir"]
            if not path.is_dir():
                raise ConfigError(f"chat dataset {prefix}: its tokenizer {path} is missing")
            return path
    return None


def packing_summary(dataset) -> list[str]:
    """One line per chat dataset inside a (blended) training dataset."""
    parts = getattr(dataset, "datasets", [dataset])
    lines = []
    for part in parts:
        plan = getattr(part, "plan", None)
        if plan is not None:
            lines.append(f"{os.path.basename(part.dataset_path)}: {len(part.indices)} {part.dataset.noun} in "
                         f"{plan.num_sequences} sequences, {100 * plan.efficiency:.1f}% non-padding "
                         f"({part.config.packing})")
    return lines
