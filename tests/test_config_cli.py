"""Paths on the command line are taken from the current directory; paths inside a config file
from that file's folder (the rule every tool our users know)."""

from pathlib import Path

import pytest

from megasmol.config.run import cli_override, load_run_config


def test_command_line_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "run.yaml").write_text("model: smollm3-tiny\nrun_dir: runs/in-file\n"
                                      "data: {recipe: demo, root: tokens}\n"
                                      "training: {train_steps: 10, global_batch_size: 1, "
                                      "micro_batch_size: 1}\n"
                                      "schedule: {warmup_steps: 1}\n")
    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    (work / "recipes" / "mine.yaml").write_text("name: mine\nstages: []\n")
    monkeypatch.chdir(work)
    sets = [cli_override(item) for item in (
        "run_dir=runs/x", "data.root=../tok", "checkpoint.init_from=null", "model=smollm3-tiny",
        "data.recipe=recipes/mine.yaml", "training.train_steps=5", "checkpoint.branch_from=runs/a@20",
        "run_dir=/abs/run")]
    assert sets == [f"run_dir={work}/runs/x", f"data.root={tmp_path}/tok", "checkpoint.init_from=null",
                    "model=smollm3-tiny", f"data.recipe={work}/recipes/mine.yaml", "training.train_steps=5",
                    f"checkpoint.branch_from={work}/runs/a@20", "run_dir=/abs/run"]
    config = load_run_config(configs / "run.yaml", sets[:2])
    assert config.path(config.run_dir) == work / "runs" / "x"
    assert config.path(config.data.root) == tmp_path / "tok"
    # Written in the file: relative to the file.
    plain = load_run_config(configs / "run.yaml")
    assert config.path(plain.run_dir) == configs / "runs" / "in-file"
    assert plain.path(plain.data.root) == Path(configs / "tokens")


def test_every_field_documented_as_a_file_or_folder_is_marked_as_a_path():
    """The command line's path rule follows the fields' own ``PATH`` / ``NAME_OR_PATH`` marks (no
    hand-kept list): a new field whose docstring says it names a path, directory, folder or file
    must carry one, or be named here as not being one."""
    import dataclasses
    import re
    import typing

    from megasmol.config.reference import field_docs
    from megasmol.config.run import RunConfig
    from megasmol.config.typed import path_fields

    not_paths = {"checkpoint.post_save_command", "logging.trackers", "logging.project",
                 "logging.run_name", "eval.tasks",  # a command, names, and a list of names or YAMLs
                 "logging.mlflow_tracking_uri"}  # a URI, read by MLflow
    marked, unmarked = path_fields(RunConfig), []
    says_path = re.compile(r"\b(path|directory|folder|file)\b", re.I)

    def walk(cls, prefix=""):
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                walk(hints[field.name], f"{prefix}{field.name}.")
            elif (field.init and says_path.search(docs.get(field.name, ""))
                  and prefix + field.name not in set(marked) | not_paths):
                unmarked.append(prefix + field.name)

    walk(RunConfig)
    assert not unmarked, f"mark these fields metadata=PATH or NAME_OR_PATH (config/typed.py): {unmarked}"
    assert {"run_dir", "checkpoint.dir", "preference.reference", "paths_from"} <= {
        k for k, kind in marked.items() if kind == "path"}
    assert cli_override("paths_from=shared") == f"paths_from={Path.cwd() / 'shared'}"


def test_a_missing_input_is_one_line_before_any_heavy_import(tmp_path):
    """A mistyped --config / --checkpoint / --hf / run directory is reported before torch,
    Megatron-Core or transformers load (it used to take 5-25 s and sometimes a traceback)."""
    import subprocess
    import sys
    import time

    for argv in (["export-hf", "--checkpoint", "/missing/ckpt", "--out", str(tmp_path / "hf")],
                 ["chat", "--hf", "/missing/ckpt", "--message", "hi"],
                 ["compare", str(tmp_path / "run-a"), "/missing/ckpt"]):
        started = time.time()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "megasmol", *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and time.time() - started < 30, proc.stderr[-500:]
        errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
        assert len(errors) == 1 and "no such file or directory" in errors[0], errors
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not imported & {"torch", "transformers", "megatron.core"}, argv


def test_every_argument_that_names_an_input_is_checked_before_the_command_runs():
    """Inputs are marked where the argument is declared (``type=input_path(...)``): every
    ``--config``, ``--checkpoint``, ``--hf``, ``--checkpoints``, ``--input`` and ``RUN_DIR`` of
    every command carries the mark, so cli.main checks it before any heavy import."""
    import argparse

    from megasmol.cli import build_parser

    def subcommands(parser):
        for action in parser._actions:  # noqa: SLF001 (argparse has no API for this)
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                for name, sub in action.choices.items():
                    yield name, sub
                    yield from ((f"{name} {n}", s) for n, s in subcommands(sub))

    inputs = {"config", "checkpoint", "hf", "checkpoints", "input", "runs"}
    seen, unmarked = 0, []
    for name, sub in subcommands(build_parser()):
        for action in sub._actions:  # noqa: SLF001
            if action.dest in inputs:
                seen += 1
                if getattr(action.type, "__name__", None) != "path":
                    unmarked.append(f"{name} {action.option_strings or action.metavar}")
    assert seen >= 15 and not unmarked, unmarked


def test_an_object_store_url_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    """``checkpoint.dir: s3://bucket/run`` used to write a local folder named ``s3:``: the user
    believed the checkpoints were in the bucket. Now s3:// is a bucket in the fields that take one
    (checkpoint.dir, init_from and branch_from: ckpt/remote.py), and any other URL, or a URL in any
    other path field, is one error naming the field, written in the file or given with --set."""
    from megasmol.config.typed import ConfigError

    config = tmp_path / "run.yaml"
    config.write_text("model: smollm3-tiny\ndata: {recipe: demo}\n"
                      "training: {train_steps: 10, global_batch_size: 1, micro_batch_size: 1}\n"
                      "schedule: {warmup_steps: 1}\ncheckpoint: {dir: 's3://bucket/run'}\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_run_config(config)
    assert loaded.checkpoint_url == "s3://bucket/run"
    assert loaded.checkpoint_dir == tmp_path / "runs" / "default" / "checkpoints"  # the staging copy
    staged = load_run_config(config, [cli_override("checkpoint.staging_dir=stage")])
    assert staged.checkpoint_dir == tmp_path / "stage"
    plain = config.read_text().replace("checkpoint: {dir: 's3://bucket/run'}\n", "")
    config.write_text(plain)
    load_run_config(config)  # the same config without the URL loads
    branch = load_run_config(config, [cli_override("checkpoint.branch_from=s3://bucket/run@5")])
    assert branch.checkpoint.branch_from == "s3://bucket/run@5"  # fetched by train/bucket.py
    for item in ("checkpoint.init_from=gs://bucket/ckpt", "checkpoint.dir=s3://b/x",
                 "run_dir=s3://bucket/run", "checkpoint.dir=https://host/run",
                 "checkpoint.staging_dir=stage", "checkpoint.branch_from=s3://b/run@5"):
        with pytest.raises(ConfigError, match=f"^{item.split('=')[0]}: "):
            load_run_config(config, [cli_override(item)])
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))
