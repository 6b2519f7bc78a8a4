"""Read one tensor (or one layer of a stacked tensor) at a time from a dist checkpoint.

Megatron-Core's ``torch_dist`` format is PyTorch Distributed Checkpoint (DCP) underneath, with
per-layer parameters stacked into one global tensor ``[num_layers, ...]`` whatever the TP/PP
layout that wrote it.  This reader asks DCP for exactly the slice it needs, so converting a
model never holds more than one layer's tensor beside the output buffer.  It needs no process
group.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megasmol.ckpt.checkpoint import CheckpointError, describe_error, load_errors, resolve


class _SlicePlanner(DefaultLoadPlanner):
    """Reads each requested key into a destination that covers a slice at ``offsets``."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__()
        self._offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, dest in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets[fqn]), sizes=dest.shape)
            items += create_read_items_for_chunk_list(
                fqn, self.metadata.state_dict_metadata[fqn], [chunk]
            )
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]


class CheckpointReader:
    def __init__(self, path: str | Path):
        self.path = resolve(path)
        self._reader = FileSystemReader(str(self.path))
        try:
            metadata = self._reader.read_metadata()
        except load_errors() as exc:
            raise CheckpointError(f"{self.path}/.metadata: unreadable checkpoint metadata: "
                                  f"{describe_error(exc)}") from None
        self._tensors = {
            key: md for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, key: str) -> torch.Size:
        return self._meta(key).size

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key).properties.dtype

    def _meta(self, key: str) -> TensorStorageMetadata:
        if key not in self._tensors:
            raise CheckpointError(f"{self.path}: tensor {key!r} is not in the checkpoint")
        return self._tensors[key]

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """The whole tensor, or layer ``layer`` of a layer-stacked one."""
        shape = self.shape(key)
        if layer is None:
            return self.read_slice(key, (0,) * len(shape), tuple(shape))
        if not 0 <= layer < shape[0]:
            raise CheckpointError(f"{key}: layer {layer} outside 0..{shape[0] - 1}")
        return self.read_slice(key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:]))[0]

    def read_slice(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The block of ``key`` that starts at ``offsets`` and has shape ``sizes``."""
        dest = torch.empty(sizes, dtype=self.dtype(key))
        try:
            dcp.load({key: dest}, storage_reader=self._reader,
                     planner=_SlicePlanner({key: tuple(offsets)}), no_dist=True)
        except load_errors() as exc:
            raise CheckpointError(f"{self.path}: cannot read {key}: {describe_error(exc)}") from None
        return dest
