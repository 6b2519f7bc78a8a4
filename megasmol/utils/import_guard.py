"""Keep Megatron-Core from importing W&B at start-up.

Megatron-Core imports ``wandb`` at module level wherever it is installed (its timers and its
inference engine log to it), which costs every megasmol process about 0.6 s although megasmol
never uses Megatron's W&B logging: runs that log to W&B do so through ``train/trackers.py``.
This finder answers ``ImportError`` to an ``import wandb`` made by a ``megatron.*`` module, so
Megatron takes its no-W&B path; every other importer, megasmol's tracker or user code, imports
``wandb`` as usual.
"""

from __future__ import annotations

import sys


class _MegatronWandbGuard:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "wandb":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if not module.startswith(("importlib", "_frozen_importlib")) and module != __name__:
                if module.startswith("megatron."):
                    raise ImportError("wandb is not loaded for Megatron-Core's own logging (megasmol)")
                return None
            frame = frame.f_back
        return None


def install() -> None:
    if not any(isinstance(f, _MegatronWandbGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronWandbGuard())
