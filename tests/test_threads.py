"""No OpenMP team in gloo's worker threads after loading a checkpoint on the CPU."""

import json
import subprocess
import sys

import pytest
import torch

from megasmol.model.init import init_checkpoint
from megasmol.runtime.threads import one_intra_op_thread
from tests.specs import tiny_smollm3


def test_one_intra_op_thread_restores_the_count_even_on_error(monkeypatch):
    suite_threads = torch.get_num_threads()  # 1 under the suite (tests/conftest.py)
    torch.set_num_threads(2)  # a count the block changes, so that restoring it shows
    try:
        with pytest.raises(KeyError):
            with one_intra_op_thread():
                assert torch.get_num_threads() == 1
                raise KeyError("boom")
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with one_intra_op_thread():  # a GPU machine keeps its threads
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(suite_threads)


# Every gloo process group runs two worker threads (pt_gloo_runloop) and one TCP loop thread; an
# OpenMP team started by a worker adds threads that inherit the worker's name.
LOAD = """
import collections, json, os, sys
import torch
torch.set_num_threads(2)  # a team needs more than one thread
from megasmol.model.load import load_checkpoint_model
load_checkpoint_model(sys.argv[1])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
count = collections.Counter(names)
print(json.dumps({"workers": count["pt_gloo_runloop"], "groups": count["gloo_tcp_loop"],
                  "threads": torch.get_num_threads()}))
"""


def test_loading_a_checkpoint_leaves_gloos_threads_without_openmp_teams(tmp_path):
    """A worker thread with its own team makes libgomp stop spinning at the barriers of the main
    thread's team (more team threads than CPUs): forward passes slowed by 5-9% on two cores."""
    # Enough layers that Megatron-Core's metadata all-gather is above torch's grain size (at 32
    # layers it is; at 8 it is not, and the test could not fail).
    init_checkpoint(tiny_smollm3(num_layers=48), tmp_path / "ckpt", seed=3)
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["groups"] >= 1  # Megatron-Core's parallel state is up
    assert seen["workers"] == 2 * seen["groups"], seen
    assert seen["threads"] == 2  # the load hands the threads back


@pytest.mark.parametrize("chosen,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_asks_for_passive_openmp_waits_before_torch_loads(chosen, expected):
    """``megasmol`` sets OMP_WAIT_POLICY before torch (libgomp reads it once, when it loads) and
    keeps a policy the user chose; its child processes inherit it."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if chosen:
        env["OMP_WAIT_POLICY"] = chosen
    code = ("import os, subprocess, sys\n"
            "from megasmol.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "from megasmol.runtime.openmp import passive_waits\n"
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n"
            "import torch\n"
            "child = 'import os; print(os.environ[\"OMP_WAIT_POLICY\"])'\n"
            "print(passive_waits(), subprocess.run([sys.executable, '-c', child], capture_output=True,"
            " text=True).stdout.strip())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-4:] == ["False", expected, "False", expected]  # after the help text
