"""Run Megatron-Core's real code on a machine without a GPU.

Megatron-Core assumes CUDA throughout: ``torch.cuda.current_device()`` as a device,
``.cuda()`` calls, ``device="cuda"`` literals, CUDA RNG state in the tensor-parallel RNG
tracker, CUDA streams/events, and checks such as ``param.type() == "torch.cuda.FloatTensor"``
in its optimizers.  This module redirects exactly those to the CPU so that GPTModel, TP/PP
with gloo, Megatron DDP, the distributed optimizer and ``dist_checkpointing`` run unchanged
on CPU.  It is what lets the tests and the demo exercise the real engine.

Rules:
* It is switched on by :func:`activate_if_needed`, which does nothing when CUDA is available.
  ``MEGASMOL_CPU_COMPAT=off`` keeps it off; ``=on`` insists on it and fails on a GPU machine.
  It can never be active on a machine where ``torch.cuda.is_available()`` is true.
* Everything it changes lives in this file; nothing else in megasmol patches torch or Megatron.

What it does:
1. A :class:`torch.overrides.TorchFunctionMode` that rewrites CUDA devices (``"cuda"``,
   ``"cuda:N"``, ``torch.device("cuda")``, integer device ordinals) to ``"cpu"`` in factory
   functions and ``Tensor.to``; makes ``Tensor.cuda()``/``pin_memory()`` identities; and
   reports ``Tensor.type()`` with the CUDA type name Megatron's optimizers check for.
2. ``torch.cuda`` functions that would raise without CUDA (current_device, synchronize,
   streams, events, RNG state, memory stats, NVTX) become CPU equivalents or no-ops.  The CUDA
   RNG becomes the CPU default generator, so Megatron's per-TP-rank RNG tracker still gives
   each tensor-parallel rank its own stream.
3. In a single process, Megatron-Core's parallel state gets one shared gloo group for all its
   groups (:func:`one_group_for_one_process`, used by ``runtime.distributed.init_parallel``).
4. The queue through which Megatron-Core's checkpoint writer returns its results is served by a
   forked manager process instead of a spawned one (``runtime/children.py``, which asks
   :func:`is_active`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

from megasmol.errors import InputError

ENV_VAR = "MEGASMOL_CPU_COMPAT"

_mode: _CudaToCpuMode | None = None


def is_active() -> bool:
    return _mode is not None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Bare integers are CUDA ordinals in torch's device parsing.
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.is_pinned:
            return False
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NoEvent()

    def query(self):
        return True


class _NoEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop():
    # A fresh function each time: torch._dynamo rejects one object standing in for two
    # torch functions.
    def noop(*args, **kwargs):
        return None

    return noop


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # The CPU device itself rather than ordinal 0: Megatron also uses it as
    # ``with torch.device(torch.cuda.current_device())``, which an ordinal would make CUDA.
    cuda.current_device = lambda: _CPU
    cuda.set_device = _noop()
    cuda.synchronize = _noop()
    cuda.empty_cache = _noop()
    cuda.Stream = _NoStream
    cuda.Event = _NoEvent
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_stream = _noop()
    cuda.memory_stats = lambda *a, **k: {}
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = _noop()
    cuda.nvtx.range_push = _noop()
    cuda.nvtx.range_pop = _noop()
    cuda.nvtx.mark = _noop()

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(state, device="cuda"):
        torch.set_rng_state(state)

    def manual_seed(seed):
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which stays lazy.
        torch.default_generator.manual_seed(int(seed))

    cuda.get_rng_state = get_rng_state
    cuda.random.get_rng_state = get_rng_state
    cuda.set_rng_state = set_rng_state
    cuda.random.set_rng_state = set_rng_state
    cuda.manual_seed = manual_seed
    cuda.random.manual_seed = manual_seed


class _DropSharedRngWarning(logging.Filter):
    # With one generator standing for both "CPU" and "CUDA" RNG, Megatron's check that the CPU
    # state is untouched inside a tracker fork always fires; it is expected here.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    logging.getLogger(mc_random.__name__).addFilter(_DropSharedRngWarning())

    mc_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mc_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )


def wanted() -> bool:
    """Whether the layer should be on for this process (see the module docstring)."""
    setting = os.environ.get(ENV_VAR, "auto").lower()
    if setting not in ("auto", "on", "off"):
        raise InputError(f"{ENV_VAR} must be auto, on or off, not {setting!r}")
    if setting == "off":
        return False
    if torch.cuda.is_available():
        if setting == "on":
            raise RuntimeError(
                f"{ENV_VAR}=on but a CUDA GPU is present: the CPU compatibility layer never "
                "runs on a GPU machine"
            )
        return False
    return True


@contextlib.contextmanager
def suspended():
    """The torch-function mode off for a stretch that needs none of its redirections: the
    forward passes of a model already built, on tensors already on the CPU (``torch.cuda``'s
    replacements stay). Every torch call under the mode is a Python call; a Megatron-Core forward
    makes thousands, which cost evaluation about 5% on two cores. Does nothing when the layer is
    off or another mode is above it."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if _mode is None or _get_current_function_mode() is not _mode:
        yield
        return
    with _pop_mode_temporarily():
        yield


@contextlib.contextmanager
def one_group_for_one_process():
    """Megatron-Core's parallel state in a process that is the whole world: every group it asks
    for (about twenty, each of the one rank) becomes one shared gloo group. Every gloo group
    keeps a TCP loop thread that wakes 100 times a second whether or not it has work; twenty of
    them woke 2,000 times a second and slowed CPU forward passes by 5-7% on two cores
    (``bench/RESULTS.md``). Collectives over a group of one rank are the same whichever group
    it is. Does nothing when the layer is off or the world has more than one rank."""
    if _mode is None or torch.distributed.get_world_size() != 1:
        yield
        return
    create = torch.distributed.new_group
    shared = []

    def new_group(*args, **kwargs):
        if not shared:
            shared.append(create(*args, **kwargs))
        return shared[0]

    torch.distributed.new_group = new_group
    try:
        yield
    finally:
        torch.distributed.new_group = create


def activate_if_needed() -> bool:
    """Switch the layer on when this machine has no CUDA; returns whether it is active."""
    global _mode
    if _mode is not None:
        return True
    if not wanted():
        return False
    assert not torch.cuda.is_available()
    # Import torch._dynamo (through Megatron's jit fusers) before patching torch.cuda: its
    # trace rules snapshot torch.cuda's functions on first import.
    import megatron.core.tensor_parallel  # noqa: F401

    _patch_torch_cuda()
    _patch_megatron()
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    return True
