"""What megasmol trusts in a checkpoint it reads: data, never code.

A ``dist_checkpointing`` directory holds three kinds of files that PyTorch would unpickle:

* ``.metadata`` (PyTorch DCP's index of tensors and chunks), which DCP reads with a plain
  ``pickle.load``;
* byte items (Megatron's ``ShardedObject``s, e.g. megasmol's RNG streams), which DCP's load
  planner reads with ``torch.load(weights_only=False)``;
* ``common.pt`` (non-sharded state), which Megatron-Core reads with ``torch.load`` (in the
  pinned torch, ``weights_only=True``).

:func:`install` restricts the first two for this process, and names the third when PyTorch's
safe loader refuses it: ``.metadata`` through an unpickler
that admits only DCP's metadata classes and torch's size/dtype/layout values, byte items through
``torch.load(weights_only=True)`` (tensors, numbers, strings and containers). A file that asks
for anything else fails with :class:`UntrustedCheckpoint` naming it, before any of its code runs.
Model weights themselves are raw tensor bytes and JSON (``megasmol.json``, ``metadata.json``).
"""

from __future__ import annotations

import enum
import io
import pickle

import torch

from megasmol.errors import UserError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint._extension")
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
_FUNCTIONS = {("torch.serialization", "_get_layout"), ("torch", "Size"),
              ("collections", "OrderedDict")}

_installed = False


class UntrustedCheckpoint(UserError, pickle.UnpicklingError):
    """A checkpoint file asked to load something other than checkpoint data."""


class MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses and enums, and torch's size/dtype/layout values."""

    def find_class(self, module: str, name: str):
        if (module, name) in _FUNCTIONS:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, _TORCH_VALUES):
                return value
        elif module in _DCP_MODULES:
            value = super().find_class(module, name)
            if isinstance(value, type) and (getattr(value, "__dataclass_fields__", None) is not None
                                            or issubclass(value, enum.Enum)):
                return value
            if isinstance(value, dict) and name.startswith("_MEM_FORMAT"):
                return value  # DCP's memory-format encoding table
        raise UntrustedCheckpoint(f"refuses to load {module}.{name}")


def msc_off() -> None:
    """Megatron-Core reads and writes checkpoints through multi-storage-client whenever that package
    is installed; megasmol never does (an ``s3://`` checkpoint is staged on local disk:
    ``ckpt/remote.py``), so a package that happens to be present changes nothing, and every
    checkpoint file is read through the restricted loaders above."""
    from megatron.core.msc_utils import MultiStorageClientFeature

    MultiStorageClientFeature.disable()


def load_metadata(stream) -> object:
    return MetadataUnpickler(stream).load()


def install() -> None:
    """Route DCP's metadata and byte-item loading through the restricted loaders (idempotent)."""
    global _installed
    msc_off()
    if _installed:
        return
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import ReadItem

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = load_metadata(stream)
            except UntrustedCheckpoint as exc:
                raise UntrustedCheckpoint(f"{path}: {exc} (not DCP metadata)") from None
        _confine_storage_paths(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UntrustedCheckpoint(
                f"object {read_item.dest_index.fqn!r} is not plain data (tensors, numbers, "
                f"strings, containers): {str(exc).splitlines()[0]}") from None
        _store_bytes_item(self, read_item, obj)

    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    load_common = TorchCommonLoadStrategy.load_common

    def checked_load_common(self, checkpoint_dir):
        try:
            return load_common(self, checkpoint_dir)
        except pickle.UnpicklingError as exc:  # torch's text suggests weights_only=False: never
            raise UntrustedCheckpoint(
                f"{checkpoint_dir}/common.pt: refused, it holds something other than checkpoint "
                f"data ({str(exc).splitlines()[0][:200]}); megasmol never loads checkpoint files "
                "with weights_only=False, so this file cannot be read") from None

    FileSystemReader.read_metadata = read_metadata
    DefaultLoadPlanner.load_bytes = load_bytes
    TorchCommonLoadStrategy.load_common = checked_load_common
    _installed = True


def _confine_storage_paths(metadata, path) -> None:
    """Every file the index names must be a file of the checkpoint directory itself: a name, not
    a path that leaves it (``../``, absolute, or into a subdirectory)."""
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if not relative or "/" in relative or "\\" in relative or relative in (".", ".."):
            raise UntrustedCheckpoint(f"{path}: names the file {relative!r}, which is not a file of "
                                      "this checkpoint directory (refused)")


def _store_bytes_item(planner, read_item, obj) -> None:
    """Where DCP's own ``DefaultLoadPlanner.load_bytes`` puts a loaded object."""
    from torch.distributed.checkpoint._traverse import set_element

    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj
