"""Training batches from a staged recipe, through Megatron-Core's dataset builders.

Each stage of the plan is one ``BlendedMegatronDatasetBuilder`` build over ``GPTDataset``: the
document, sample and shuffle indices are built once (on rank 0, then loaded by the others),
cached on disk, and every sample is an O(1) lookup, whatever the length of the run. Samples
are shuffled at the sequence level, so a batch draws windows from many documents.

Which samples a step uses is a pure function of the step: stage-local sample
``first_sample(step) + m * (micro_batch * dp) + dp_rank * micro_batch + i`` for micro-batch
``m``, where ``first_sample(step)`` counts the sequences of the stage's earlier steps
(``(step - first_step) * global_batch`` without a batch ramp-up). A resumed run, at any step
of any stage, sees exactly the batches an uninterrupted run would, and the split across
data-parallel ranks keeps the global batch the same for any layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from megasmol.config.typed import ConfigError
from megasmol.data.recipe import DataRecipe, StagePlan, stage_for_step
from megasmol.data.tokenize import missing_parts
from megasmol.utils.prefetch import prefetched

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.model.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenIds:
    """The token facts Megatron's GPTDataset asks of a tokenizer."""

    vocab_size: int
    eod: int
    pad: int

    @classmethod
    def from_spec(cls, spec) -> TokenIds:
        # Megatron masks the loss where labels equal pad: a pad id that never occurs in text
        # (-1 when the spec has none) keeps every real token trained.
        return cls(spec.vocab_size, spec.eos_token_id,
                   spec.pad_token_id if spec.pad_token_id is not None else -1)

    @property
    def unique_identifiers(self) -> dict:
        # Part of the hash naming Megatron's cached indices.
        return {"class": "megasmol.TokenIds", "vocab_size": self.vocab_size, "eod": self.eod,
                "pad": self.pad}


@dataclass
class StageData:
    plan: StagePlan
    train: object
    valid: Optional[object]


def _split(validation_fraction: float) -> str:
    train = 100.0 * (1.0 - validation_fraction)
    return f"{train:g},{100.0 - train:g},0"


def check_dataset_files(recipe: DataRecipe, plans: list[StagePlan], root: Optional[str]) -> None:
    missing = []
    for plan in plans:
        for entry in plan.stage.datasets:
            prefix = recipe.dataset_prefix(entry, root)
            for suffix in missing_parts(prefix):
                missing.append(f"{prefix}{suffix} (stage {plan.stage.name}, {entry.label})")
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"data recipe {recipe.name}: missing dataset file(s): {shown}")


def build_stage_data(recipe: DataRecipe, plans: list[StagePlan], token_ids: TokenIds, *,
                     seed: int, cache_dir: Path, root: Optional[str] = None,
                     document_masking: bool = True, validation_fraction: float = 0.0,
                     validation_samples: int = 0, packing: str = "ffd") -> list[StageData]:
    """Build (or load from ``cache_dir``) the train/validation datasets of every planned stage.

    Collective when torch.distributed is initialized: every rank must call it.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from megasmol.data.masked.dataset import SequenceDataset, SequenceDatasetConfig, packing_summary
    from megasmol.data.masked.descriptions import CHAT, PREFERENCE
    from megasmol.runtime.distributed import init_distributed

    check_dataset_files(recipe, plans, root)
    chat = sorted({str(recipe.dataset_prefix(e, root)) for p in plans for e in p.stage.datasets
                   if CHAT.read(recipe.dataset_prefix(e, root)) is not None})
    pairs = sorted({str(recipe.dataset_prefix(e, root)) for p in plans for e in p.stage.datasets
                    if PREFERENCE.read(recipe.dataset_prefix(e, root)) is not None})
    if pairs and not document_masking:
        raise ConfigError(f"{pairs[0]} is preference data: each sequence holds both halves of a pair, so it "
                          "needs data.document_masking=true (attention stays inside each half)")
    if chat and packing == "ffd" and not document_masking:
        raise ConfigError(f"data.packing=ffd packs several conversations into a sequence ({chat[0]} is "
                          "chat data): it needs data.document_masking=true so attention stays inside "
                          "each conversation (or use data.packing=none)")
    if not torch.distributed.is_initialized():
        init_distributed()  # Megatron's builders coordinate ranks even in a single process
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        _drop_damaged_cache_files(cache_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    stages = []
    for plan in plans:
        prefixes = [str(recipe.dataset_prefix(e, root)) for e in plan.stage.datasets]
        weights = [e.weight for e in plan.stage.datasets]
        config = SequenceDatasetConfig(
            # A seed per stage: a dataset shared by two stages is reshuffled, not replayed.
            random_seed=seed + 1009 * plan.index,
            sequence_length=plan.seq_length,
            blend=(prefixes, weights if len(prefixes) > 1 else None),
            split=_split(validation_fraction),
            path_to_cache=str(cache_dir),
            tokenizer=token_ids,
            reset_position_ids=False,  # restarting, when asked, happens per batch (masking.py)
            reset_attention_mask=False,
            eod_mask_loss=document_masking,
            create_attention_mask=False,
            packing=packing,
        )
        wanted_valid = validation_samples if validation_fraction > 0 else 0
        with _atomic_numpy_saves():
            train, valid, _ = BlendedMegatronDatasetBuilder(
                SequenceDataset, [plan.samples, wanted_valid, 0], lambda: True, config).build()
        if train is None or len(train) < plan.samples:
            raise ConfigError(f"stage {plan.stage.name}: the datasets yield "
                              f"{0 if train is None else len(train)} training samples, the plan needs "
                              f"{plan.samples}")
        for line in packing_summary(train):
            log.info("stage %s packing: %s", plan.stage.name, line)
        stages.append(StageData(plan, train, valid))
    return stages


@contextlib.contextmanager
def _atomic_numpy_saves():
    """Megatron-Core's dataset builders write their index caches with ``numpy.save`` under the
    final names, so a kill mid-write leaves a short file that every later start maps and fails
    on. While they build, each array is written to a temporary name, synced and renamed."""
    from megasmol.utils.fs import atomic_save_npy

    original = np.save

    def save(file, arr, *args, **kwargs):
        if not isinstance(file, (str, os.PathLike)):
            return original(file, arr, *args, **kwargs)
        atomic_save_npy(file, arr, save=lambda fh, a: original(fh, a, *args, **kwargs))

    np.save = save
    try:
        yield
    finally:
        np.save = original


def _drop_damaged_cache_files(cache_dir: Path) -> None:
    """Delete index-cache arrays that cannot be mapped (written by a run killed mid-write before
    saves were atomic), with their description, so they are rebuilt instead of failing."""
    for path in cache_dir.glob("*.npy"):
        try:
            np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            stem = path.name.rsplit("-", 1)[0]
            log.warning("index cache %s is damaged (%s); rebuilding it", path, exc)
            for sibling in cache_dir.glob(stem + "-*"):
                sibling.unlink(missing_ok=True)
    for tmp in cache_dir.glob("*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _collate(samples: list[dict]) -> dict:
    # BlendedDataset adds a scalar ``dataset_id`` (which mixture entry a sample came from).
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


class TrainingBatches:
    """The micro-batches of each step for one data-parallel rank."""

    def __init__(self, stages: list[StageData], micro_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1):
        self.stages = stages
        self.plans = [s.plan for s in stages]
        self.micro_batch_size = micro_batch_size
        self.dp_rank = data_parallel_rank
        self.dp_size = data_parallel_size
        per_micro = micro_batch_size * data_parallel_size
        for global_batch in self.plans[0].batch.levels():
            if global_batch % per_micro:
                raise ConfigError(f"global batch {global_batch} (training.global_batch_size or a "
                                  "training.batch_rampup level) is not divisible by micro_batch_size "
                                  f"x data_parallel = {micro_batch_size} x {data_parallel_size}")
        self.num_micro_batches = self.plans[0].global_batch_size // per_micro

    @property
    def last_step(self) -> int:
        return self.plans[-1].last_step

    def tokens_through(self, step: int) -> int:
        """Training tokens of steps 1..``step`` (skipped steps included: their data was drawn)."""
        return sum((plan.batch.samples_through(min(plan.last_step, step))
                    - plan.batch.samples_through(plan.first_step - 1)) * plan.seq_length
                   for plan in self.plans if plan.first_step <= step)

    def stage_at(self, step: int) -> StagePlan:
        return stage_for_step(self.plans, step)

    def sample_indices(self, step: int) -> np.ndarray:
        """[micro_batches, micro_batch_size] stage-local sample indices of this rank at ``step``."""
        plan = self.stage_at(step)
        base = plan.first_sample(step)
        count = plan.batch.at(step) // (self.micro_batch_size * self.dp_size)
        micro = np.arange(count)[:, None] * (self.micro_batch_size * self.dp_size)
        within = self.dp_rank * self.micro_batch_size + np.arange(self.micro_batch_size)[None, :]
        return base + micro + within

    def micro_batches(self, step: int) -> list[dict]:
        plan = self.stage_at(step)
        dataset = self.stages[plan.index].train
        return [_collate([dataset[int(i)] for i in row]) for row in self.sample_indices(step)]

    def iterate(self, first_step: int, prefetch: int = 2) -> Iterator[tuple[int, StagePlan, list[dict]]]:
        """(step, stage, micro-batches) from ``first_step`` to the end, ``prefetch`` steps ahead."""
        def produce():
            for step in range(first_step, self.last_step + 1):
                yield step, self.stage_at(step), self.micro_batches(step)

        return prefetched(produce(), depth=prefetch) if prefetch > 0 else produce()

    def validation_micro_batches(self, step: int, num_steps: int) -> list[dict]:
        """A fixed held-out set of the stage active at ``step`` (the same every evaluation)."""
        plan = self.stage_at(step)
        dataset = self.stages[plan.index].valid
        if dataset is None or num_steps < 1:
            return []
        batches = []
        for eval_step in range(num_steps):
            base = eval_step * plan.global_batch_size
            for m in range(self.num_micro_batches):
                start = base + m * self.micro_batch_size * self.dp_size + self.dp_rank * self.micro_batch_size
                rows = [dataset[(start + i) % len(dataset)] for i in range(self.micro_batch_size)]
                batches.append(_collate(rows))
        return batches


def recipe_batches(config: RunConfig, recipe: DataRecipe, plans: list[StagePlan], spec: ModelSpec,
                   dp_rank: int, dp: int) -> TrainingBatches:
    """The recipe's datasets, built (or loaded from the cache) for every planned stage, as this
    data-parallel rank's micro-batches: the batches of the objectives that train on datasets."""
    stages = build_stage_data(
        recipe, plans, TokenIds.from_spec(spec), seed=config.training.seed,
        cache_dir=config.cache_dir, root=config.data.root and str(config.path(config.data.root)),
        document_masking=config.data.document_masking,
        validation_fraction=config.data.validation_fraction, packing=config.data.packing,
        validation_samples=config.eval.steps * config.training.global_batch_size)
    return TrainingBatches(stages, config.training.micro_batch_size, dp_rank, dp)
