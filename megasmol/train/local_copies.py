"""Local copies of the training state (``resilience.local_checkpoint_every``), for in-process
restart: every N steps each rank writes what a checkpoint would restore (model, optimizer, RNG
streams, and in ``megasmol.json``'s place the step, data position and spike window) to a node-local
directory through NVIDIA Resiliency Extension's ``LocalCheckpointManager``, as Megatron-LM does
with ``--non-persistent-ckpt-type local``: the state is Megatron-Core's
``MCoreTensorAwareStateDict`` of the training checkpoint's sharded state dict (``atomic``: each
rank keeps every shard it holds, so no exchange is needed to load it back under the same layout),
with the distributed optimizer's state in its own buckets (``dp_reshardable``: no gather across
the data-parallel ranks, which the checkpoint's reshardable format needs).

After a fault, the healed attempt asks every rank which copies it holds (the manager's
``find_latest``: the newest step that every rank of the rebuilt world has complete) and loads it
where it is newer than the latest checkpoint. Nothing is replicated to other nodes: a rank whose
node is gone (a spare took its place) has no copy, and the checkpoint is used.

A fresh start never reads a copy: the files of one launch (``launch-<id>``, agreed through NVRx's
store) are found only by that launch's attempts; the first attempt removes what an earlier launch
of the same run left on this node (killed before it could), and every process removes its launch's
copies when the job ends (``remove``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from megasmol.ckpt.train_state import (
    SAME_LAYOUT_OPTIMIZER_FORMAT,
    apply_training_state,
    training_state_request,
    training_state_to_save,
)

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.train.setup import TrainingSetup

META_KEY = "megasmol"
"""The entry of the copy's state dict that holds what ``megasmol.json`` holds in a checkpoint."""
LAUNCH_PREFIX = "launch-"
_ITERATION = re.compile(r"iter_(\d+)_")
LAUNCH_KEY = "megasmol/local_copies_launch"
"""The key of NVRx's store under which the ranks agree on this launch's id."""


def run_root(config: RunConfig) -> Path:
    """This run's folder in ``resilience.local_checkpoint_dir`` (named after its run directory,
    so two runs sharing a node never touch each other's copies)."""
    from megasmol.train.setup import run_directory

    key = hashlib.sha1(str(run_directory(config).resolve()).encode()).hexdigest()[:12]
    return config.local_checkpoint_dir / f"megasmol-{key}"


def agree_launch(store) -> str:
    """The id of this launch, the same on every process (the first to ask sets it in ``store``,
    a ``torch.distributed.Store``; spares that join later read it)."""
    mine = uuid.uuid4().hex[:12]
    return store.compare_set(LAUNCH_KEY, "", mine).decode()


def remove_stale(config: RunConfig, launch: str) -> None:
    """What earlier launches of this run left on this node (never read: see the module's doc)."""
    root = run_root(config)
    for old in root.glob(f"{LAUNCH_PREFIX}*"):
        if old.name != LAUNCH_PREFIX + launch:
            shutil.rmtree(old, ignore_errors=True)


def remove(config: RunConfig, launch: str) -> None:
    """This launch's copies on this node (every process, at the end of the job; racing removals
    by the ranks of one node are harmless)."""
    root = run_root(config)
    shutil.rmtree(root / (LAUNCH_PREFIX + launch), ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # another launch's, or already gone
        pass


class _QuietNVRx(logging.Filter):
    """NVRx's checkpoint manager logs each file it writes, renames and removes at INFO on the root
    logger (``logging.info``), which would print four lines per rank per copy: kept below WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "nvidia_resiliency_ext" not in record.pathname


_QUIET = _QuietNVRx()


class LocalCopies:
    """One attempt's local copies (a new manager per attempt: its process groups are new)."""

    def __init__(self, config: RunConfig, setup: TrainingSetup, launch: str):
        from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import (
            LocalCheckpointManager,
        )

        logging.getLogger().addFilter(_QUIET)  # once: a filter is added only if not there
        self.every = config.resilience.local_checkpoint_every
        self.setup = setup
        self.manager = LocalCheckpointManager(run_root(config), session_id=LAUNCH_PREFIX + launch)
        self._sharding = None
        """Megatron's sharding of the state (checked on the first save, the same after)."""

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, metadata: dict) -> None:
        """Collective: keep the state after ``step`` (``metadata``: what ``megasmol.json`` would
        hold); the manager removes this rank's older copies once every rank has this one."""
        from megatron.core.dist_checkpointing.tensor_aware_state_dict import MCoreTensorAwareStateDict

        sharded = training_state_to_save(self.setup.model, self.setup.optimizer,
                                         SAME_LAYOUT_OPTIMIZER_FORMAT)
        sharded[META_KEY] = metadata
        state, self._sharding = MCoreTensorAwareStateDict.from_state_dict(
            sharded, algo="atomic", cached_metadata=self._sharding)
        self.manager.save(state, step)  # tensors cloned first: training may go on at once

    def newest(self) -> Optional[int]:
        """Collective: the newest step every rank holds a complete copy of, or None."""
        step = self.manager.find_latest()
        return step if step >= 0 else None

    def restore(self) -> dict:
        """Collective, after :meth:`newest` found one: load the copy into the model, optimizer and
        RNG streams; returns its metadata."""
        held, _ = self.manager.load()
        request = training_state_request(self.setup.model, self.setup.optimizer,
                                         optimizer_format=SAME_LAYOUT_OPTIMIZER_FORMAT)
        state = held.to_state_dict(request, algo="atomic")
        meta = state.pop(META_KEY)
        # Megatron-Core 0.16.1 copies a dp_reshardable state into the main parameters with
        # autograd on (its model-space loader has torch.no_grad, this one not): in fp32, where
        # they are views of the model's leaf parameters, torch refuses the in-place copy.
        with torch.no_grad():
            apply_training_state(self.setup.model, self.setup.optimizer, state)
        return meta

    def drop_after(self, step: int) -> None:
        """This rank's copies of steps after ``step`` (a rollback went back before them, or a
        fault left some ranks' newer copy: they would be written again)."""
        folder = self.manager.local_ckpt_dir
        if folder.is_dir():
            for path in folder.iterdir():
                found = _ITERATION.match(path.name)
                if found and int(found.group(1)) > step:
                    path.unlink(missing_ok=True)
        self.manager.latest_iteration = -1  # its cache of find_latest
