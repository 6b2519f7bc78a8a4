"""What ``import megasmol`` changes in Megatron-Core's own start-up (``utils/import_guard.py``),
each checked in a fresh interpreter: the import state is per process."""

import json
import subprocess
import sys

from tests.conftest import REPO

_PROBE = """
import json, sys
import torch
if sys.argv[1] == "cuda":  # what the finder sees on a GPU machine
    torch.cuda.is_available = lambda: True
import megasmol
import megatron.core
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
x = torch.randn(4, 6)
print(json.dumps({
    "fuser": jit.jit_fuser.__name__,
    "inductor": "torch._inductor.compile_fx" in sys.modules,
    "swiglu_plain": not hasattr(fused_bias_swiglu.swiglu, "__wrapped__"),  # torch.compile wraps
    "swiglu_matches": bool(torch.equal(fused_bias_swiglu.swiglu(x),
                                       torch.nn.functional.silu(x[:, :3]) * x[:, 3:]))
                      if sys.argv[1] == "cpu" else None,
    "loggers": sorted(m for m in ("wandb", "torch.utils.tensorboard", "tensorboard", "boto3")
                      if m in sys.modules),
    # megasmol's tracker and user code still import them (from a module outside megatron.*)
    "writer": __import__("torch.utils.tensorboard", fromlist=["SummaryWriter"]).SummaryWriter.__name__,
    "wandb": __import__("wandb").__name__,
}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_cuda_megatrons_fusions_are_plain_functions_and_inductor_is_not_imported():
    seen = _probe("cpu")
    assert seen["fuser"] == "noop_decorator"  # Megatron-Core's own disable_jit_fuser()
    assert not seen["inductor"]  # torch.compile at decoration time imported TorchInductor (~0.9 s)
    assert seen["swiglu_plain"] and seen["swiglu_matches"]


def test_megatron_imports_neither_wandb_nor_tensorboard_and_everyone_else_still_can():
    """Megatron-Core's timers import both for logging megasmol never asks of them (about 0.3 s
    of CPU for TensorBoard, with boto3 behind it, and 0.6 s for W&B in every process)."""
    seen = _probe("cpu")
    assert seen["loggers"] == []
    assert seen["writer"] == "SummaryWriter" and seen["wandb"] == "wandb"


def test_with_cuda_megatrons_fusions_are_left_compiled():
    seen = _probe("cuda")
    assert seen["fuser"] == "compile"
    assert not seen["swiglu_plain"]


def test_import_torch_in_the_virtualenv_gives_no_pynvml_warning():
    """A user's script in the virtualenv imports torch without the deprecated `pynvml` package's
    FutureWarning: `make setup` installs NVML's maintained bindings (nvidia-ml-py, the same
    `pynvml` module torch.cuda and megasmol's GPU checks import) and not the shim that warns."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, "-W", "always", "-c",
                          "import torch, pynvml; print(callable(pynvml.nvmlInit))"],
                         cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True"]
    assert "pynvml" not in out.stderr and "FutureWarning" not in out.stderr, out.stderr
