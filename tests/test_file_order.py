"""`make test` hands files to its xdist workers longest first (tests/file_order.py)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from tests.conftest import REPO
from tests.file_order import FILE_SECONDS, longest_first


def _items(*nodeids):
    return [SimpleNamespace(nodeid=n) for n in nodeids]


def test_files_go_longest_first_unknown_ones_before_all_and_tests_keep_their_order():
    short, long = "tests/test_spec.py", "tests/test_train.py"
    assert FILE_SECONDS[long] > FILE_SECONDS[short]
    items = _items(f"{short}::a", f"{long}::b", f"{short}::c", "tests/test_new.py::d", f"{long}::e[1]",
                   f"{long}::e[0]")
    assert [i.nodeid for i in longest_first(items)] == [
        "tests/test_new.py::d", f"{long}::b", f"{long}::e[1]", f"{long}::e[0]", f"{short}::a",
        f"{short}::c"]


def test_make_test_keeps_the_collection_order():
    """xdist's default reorder (by number of tests per file) would undo the order."""
    makefile = (REPO / "Makefile").read_text()
    xdist = next(line for line in makefile.splitlines() if line.startswith("XDIST ="))
    assert "--dist loadfile" in xdist and "--no-loadscope-reorder" in xdist
    assert "$(PY) -m pytest $(XDIST) -m \"not serial\" $(PYTEST_ARGS)" in makefile


def test_a_parallel_run_records_each_files_seconds(tmp_path):
    out = tmp_path / "seconds.json"
    env = {**os.environ, "MEGASMOL_FILE_SECONDS": str(out)}
    files = ["tests/test_data_layers.py", "tests/test_eval_layers.py"]  # two quick ones
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1",
                           "--dist", "loadfile", "--no-loadscope-reorder", *files],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    table = json.loads(out.read_text())
    assert set(table) == set(files) and all(seconds > 0 for seconds in table.values())
    assert list(table.values()) == sorted(table.values(), reverse=True)
