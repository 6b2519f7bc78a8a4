"""The CPU compatibility layer: on only without CUDA, and what it redirects."""

import json
import subprocess
import sys

import pytest
import torch

from megasmol.runtime import cpu_compat
from tests.conftest import REPO


def test_wanted_follows_cuda_and_the_environment(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(cpu_compat.ENV_VAR, "auto")
    assert cpu_compat.wanted() is False  # never on a GPU machine
    monkeypatch.setenv(cpu_compat.ENV_VAR, "on")
    with pytest.raises(RuntimeError, match="never runs on a GPU"):
        cpu_compat.wanted()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(cpu_compat.ENV_VAR, "auto")
    assert cpu_compat.wanted() is True
    monkeypatch.setenv(cpu_compat.ENV_VAR, "off")
    assert cpu_compat.wanted() is False
    monkeypatch.setenv(cpu_compat.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=cpu_compat.ENV_VAR):
        cpu_compat.wanted()


CHECK = """
import torch
from megasmol.runtime import cpu_compat
assert cpu_compat.activate_if_needed()
x = torch.zeros(3, device="cuda")
assert x.device.type == "cpu"
assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
assert torch.ones(2, device=0).device.type == "cpu"
with torch.device(torch.cuda.current_device()):
    assert torch.arange(3).device.type == "cpu"
assert x.cuda() is x and x.to("cuda:0").device.type == "cpu"
assert torch.nn.Parameter(torch.zeros(1)).type() == "torch.cuda.FloatTensor"
state = torch.cuda.get_rng_state(); a = torch.rand(3)
torch.cuda.set_rng_state(state); assert torch.equal(a, torch.rand(3))
torch.cuda.synchronize(); torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
print("ok")
"""


def test_redirects_cuda_to_cpu_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


SUSPEND = """
import torch
from torch.overrides import BaseTorchFunctionMode
from megasmol.runtime import cpu_compat
assert cpu_compat.activate_if_needed()
with cpu_compat.suspended():  # the mode is off: a CUDA literal is CUDA again
    try:
        torch.zeros(1, device="cuda")
        raise SystemExit("the mode was still on")
    except (RuntimeError, AssertionError):
        pass
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"  # patches stay
assert torch.zeros(1, device="cuda").device.type == "cpu"  # and back on after
with BaseTorchFunctionMode(), cpu_compat.suspended():  # another mode on top: left alone
    assert torch.zeros(1, device="cuda").device.type == "cpu"
print("ok")
"""


def test_suspended_turns_the_mode_off_for_a_stretch_and_back_on():
    proc = subprocess.run([sys.executable, "-c", SUSPEND], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:] + proc.stdout


def test_off_leaves_megatron_failing_on_cuda_calls():
    code = "import os; os.environ['MEGASMOL_CPU_COMPAT']='off'\n" + CHECK
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0


SHUTDOWN = """
import sys
import torch
from megasmol.runtime.distributed import init_parallel, shutdown
from megasmol.config.parallel import ParallelLayout
shutdown()  # nothing started: Megatron-Core stays unimported (it takes a second)
print("imported", "megatron.core" in sys.modules)
init_parallel(ParallelLayout())
from megatron.core import parallel_state
shutdown()
print("left", parallel_state.model_parallel_is_initialized(), torch.distributed.is_initialized())
"""


def test_shutdown_tears_down_megatrons_state_only_where_it_was_loaded():
    out = subprocess.run([sys.executable, "-c", SHUTDOWN], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split("\n")
    assert "imported False" in out and "left False False" in out


AT_EXIT = """
import atexit, torch
# Registered first, so it runs last (atexit is last in, first out): what the process left behind.
atexit.register(lambda: print("at exit", torch.distributed.is_initialized(),
                              parallel_state.model_parallel_is_initialized(), flush=True))
from megasmol.runtime.distributed import init_parallel
from megasmol.config.parallel import ParallelLayout
init_parallel(ParallelLayout())
init_parallel(ParallelLayout())
from megatron.core import parallel_state
"""


def test_a_process_that_never_calls_shutdown_is_torn_down_before_the_interpreter():
    """Gloo groups left to interpreter finalization aborted a process now and then
    ("terminate called without an active exception", about 3% of such runs)."""
    proc = subprocess.run([sys.executable, "-c", AT_EXIT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n").count("at exit False False") == 1, proc.stdout


ONE_GROUP = """
import collections, os, torch
from megasmol.runtime.distributed import init_parallel
from megasmol.config.parallel import ParallelLayout
from megatron.core import parallel_state as ps
def loops():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return collections.Counter(names)["gloo_tcp_loop"]
create = torch.distributed.new_group
init_parallel(ParallelLayout())
groups = {id(g) for g in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                          ps.get_data_parallel_group(), ps.get_context_parallel_group(),
                          ps.get_data_parallel_group_gloo(), ps.get_embedding_group())}
print("groups", len(groups), "loops", loops(), "restored", torch.distributed.new_group is create)
init_parallel(ParallelLayout())  # again, as a process that evaluates after training does
x = torch.ones(2)
torch.distributed.all_reduce(x, group=ps.get_tensor_model_parallel_group())
print("again loops", loops(), "sum", x.tolist())
"""


def test_one_process_shares_one_gloo_group_for_megatrons_parallel_state():
    """Each gloo group keeps a TCP loop thread waking 100 times a second: twenty of them slowed
    the CPU forward passes of `eval tasks --checkpoint` by 5-7%."""
    out = subprocess.run([sys.executable, "-c", ONE_GROUP], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split("\n")
    # The world group and one shared group of the one rank: at most two TCP loops, not 21 (a
    # thread names itself once it runs, so a new one may not be counted yet: at most, not equal).
    first = next(line.split() for line in out if line.startswith("groups "))
    assert first[1] == "1" and int(first[3]) <= 2 and first[5] == "True", out
    again = next(line.split() for line in out if line.startswith("again "))
    assert int(again[2]) <= 2 and again[4:] == ["[1.0,", "1.0]"], out


SAVE = """
import json, signal, sys
import psutil
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megasmol.ckpt.checkpoint import read_metadata
from megasmol.model.init import init_checkpoint
from tests.specs import tiny_llama

signal.signal(signal.SIGTERM, lambda *_: None)  # as the trainer's handler: the manager's is its own
out = init_checkpoint(tiny_llama(), sys.argv[1])
manager = psutil.Process(filesystem_async._results_queue._manager._process.pid)
caught = int(next(line for line in open(f"/proc/{manager.pid}/status") if line.startswith("SigCgt"))
             .split()[1], 16)
print(json.dumps({"step": read_metadata(out)["step"], "parent": manager.ppid() == psutil.Process().pid,
                  "same_program": manager.cmdline() == psutil.Process().cmdline(),
                  "sigterm_caught": bool(caught >> (signal.SIGTERM - 1) & 1)}))
"""


def test_checkpoint_write_results_come_back_through_a_forked_manager(tmp_path):
    """Megatron-Core spawns a fresh interpreter to serve the queue (it imports torch again, about
    3 s of CPU per process that saves); on the CPU it is forked, with default signal handling."""
    proc = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / "ckpt")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"step": 0, "parent": True, "same_program": True, "sigterm_caught": False}
