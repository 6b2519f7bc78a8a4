"""Three start-up costs of importing Megatron-Core that megasmol does not need.

* W&B. Megatron-Core imports ``wandb`` at module level wherever it is installed (its timers and its
inference engine log to it), which costs every megasmol process about 0.6 s although megasmol
never uses Megatron's W&B logging: runs that log to W&B do so through ``train/trackers.py``.
* TensorBoard. ``megatron.core.timers`` imports ``torch.utils.tensorboard`` (which imports
``tensorboard`` and, through its file layer, ``boto3``) for one ``isinstance`` check in
``Timers.write``, which megasmol never calls: about 0.3 s of CPU in every process (3.4-3.6 s
instead of 3.7-3.8 s of user time to import the training loop, 2-core VM, 2026-12-07). Runs that
log to TensorBoard import it through ``train/trackers.py``.
This finder answers ``ImportError`` to those two imports when a ``megatron.*`` module makes them,
so Megatron takes its path without them; every other importer, megasmol's tracker or user code,
imports them as usual.
* Compiling its fusions on a machine without CUDA. ``megatron.core.jit`` decorates its fused
  elementwise functions (bias-GeLU, SwiGLU, dropout-add, ...) with ``torch.compile``, which
  imports TorchInductor (and networkx) at decoration time: about 0.9 s of every ``import
  megatron.core`` on a 2-core machine. Those fusions run only on a GPU (``model/gpt.py`` turns
  the bias/activation/dropout fusions on with CUDA alone), so without CUDA this finder applies
  Megatron-Core's own ``disable_jit_fuser()`` right after ``megatron.core.jit`` runs, before any
  fusion module is decorated: they are plain functions. With CUDA nothing changes.
"""

from __future__ import annotations

import sys


class _MegatronLoggerGuard:
    NAMES = ("wandb", "torch.utils.tensorboard")

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.NAMES:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if not module.startswith(("importlib", "_frozen_importlib")) and module != __name__:
                if module.startswith("megatron."):
                    raise ImportError(f"{fullname} is not loaded for Megatron-Core's own logging (megasmol)")
                return None
            frame = frame.f_back
        return None


class _PlainFusionsWithoutCuda:
    """Finds ``megatron.core.jit`` as the next finder would, and runs its module, then
    ``disable_jit_fuser()`` where CUDA is not available."""

    NAME = "megatron.core.jit"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.NAME:
            return None
        for finder in sys.meta_path:  # whichever finder would have found it (editable installs too)
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenDisableFuser(spec.loader)
                return spec
        return None


class _ThenDisableFuser:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import torch

        if not torch.cuda.is_available():
            module.disable_jit_fuser()

    def __getattr__(self, name):  # get_source, get_code, ... as the real loader answers them
        return getattr(self.loader, name)


def install() -> None:
    for finder in (_MegatronLoggerGuard, _PlainFusionsWithoutCuda):
        if not any(isinstance(f, finder) for f in sys.meta_path):
            sys.meta_path.insert(0, finder())
