"""One console style: paths relative to the current directory when beneath it (as the user typed
them), in what commands print, in their errors and in log lines; no logger prefixes."""

import logging
import os
import subprocess
import sys

from megasmol.utils.console import ConsoleFormatter
from megasmol.utils.fs import shown, shown_paths
from tests.conftest import REPO


def _cli(cwd, *args, code=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = ["-c", code] if code else ["-m", "megasmol", *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_paths_beneath_the_current_directory_are_shown_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    assert shown(tmp_path / "runs" / "x") == "runs/x" and shown("/elsewhere/x") == "/elsewhere/x"
    assert shown_paths(f"wrote {here}/runs/hf: 3 tensors") == "wrote runs/hf: 3 tensors"
    assert shown_paths(f"--out {here} contains {here}/ckpt/iter_0000000,") == \
        "--out . contains ckpt/iter_0000000,"
    assert shown_paths(f"run_dir={here}/runs/a ('{here}/b')") == "run_dir=runs/a ('b')"
    # Another directory, or a longer name that merely starts like this one, stays as it is.
    assert shown_paths(f"{here}-old/x /other{here}/y") == f"{here}-old/x /other{here}/y"


def test_log_records_are_plain_lines_with_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    formatter = ConsoleFormatter()

    def line(name, level, message, *args):
        return formatter.format(logging.LogRecord(name, level, __file__, 1, message, args, None))

    assert line("megasmol.train.setup", logging.INFO, "weights from %s (step %s)",
                f"{tmp_path}/runs/sft/checkpoints", 150) == "weights from runs/sft/checkpoints (step 150)"
    assert line("megasmol.data.loader", logging.WARNING, "index cache %s is damaged",
                f"{tmp_path}/cache") == "warning: index cache cache is damaged"
    # Another library's warning keeps its logger's name, so its source shows.
    assert line("megatron.core.utils", logging.WARNING, "slow") == "warning: megatron.core.utils: slow"


def test_training_commands_log_without_prefixes(tmp_path):
    """What `megasmol train` (and the SFT / APO demos) configure: no `INFO megasmol...:` prefix."""
    code = ("import logging, os; from megasmol.cli import _training_process; _training_process(); "
            "logging.getLogger('megasmol.train.setup').info('weights from %s', "
            "os.path.join(os.getcwd(), 'runs', 'sft'))")
    proc = _cli(tmp_path, code=code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "weights from runs/sft"


def test_commands_print_and_refuse_with_relative_paths(tmp_path):
    """Absolute paths beneath the current directory, given or made (export-hf resolves its --out),
    are printed relative: the result line and an error line."""
    init = _cli(tmp_path, "init", "--spec", "smollm3-tiny", "--out", str(tmp_path / "ckpt"))
    assert init.returncode == 0, init.stderr
    assert init.stdout.startswith("wrote ckpt/iter_0000000 (smollm3-tiny"), init.stdout
    export = _cli(tmp_path, "export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                  str(tmp_path / "runs" / "my-export"), "--quiet")
    assert export.returncode == 0, export.stderr
    assert export.stdout.startswith("wrote runs/my-export: "), export.stdout
    refused = _cli(tmp_path, "export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                   str(tmp_path), "--overwrite")
    assert refused.returncode == 2 and str(tmp_path) not in refused.stderr
    assert refused.stderr.startswith("megasmol export-hf: error: --out . contains ckpt/iter_0000000, "
                                     "which this command reads"), refused.stderr
