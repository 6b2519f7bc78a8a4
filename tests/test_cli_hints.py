"""A hint for the commonest mistakes (issue 41): a run directory where a checkpoint is wanted,
data never built, a parallel layout in one process, preference pairs given to prepare-chat, the
one switch that turns in-loop scoring off, and a CLI that names its version, suggests the closest
command or task, describes every command and shows its one-of options."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megasmol.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "megatron.core"}


def _cli(*argv, cwd=None):
    """``python -X importtime -m megasmol ARGV``: (exit code, stdout, error lines, seconds,
    modules imported)."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "megasmol", *argv],
                          capture_output=True, text=True, timeout=300, cwd=cwd or REPO)
    seconds = time.time() - started
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    return proc.returncode, proc.stdout, errors, seconds, imported


def _fake_run(run_dir: Path, step: int = 20) -> Path:
    """A run directory's checkpoint layout (files only: what locating a checkpoint reads)."""
    iteration = run_dir / "checkpoints" / f"iter_{step:07d}"
    iteration.mkdir(parents=True)
    (iteration / "megasmol.json").write_text(json.dumps({"format": 1, "step": step}))
    (run_dir / "checkpoints" / "latest").write_text(iteration.name + "\n")
    return iteration


# --- 1. a run directory wherever a checkpoint is wanted --------------------------------------

def test_a_run_directory_resolves_to_its_latest_checkpoint(tmp_path):
    """``--checkpoint runs/demo/run`` used to be "not a megasmol checkpoint" although its
    ``checkpoints/`` held one; the one resolver now takes a run directory, also one whose config
    keeps its checkpoints elsewhere (``checkpoint.dir``, read from ``run_config.json``)."""
    from megasmol.ckpt.checkpoint import resolve

    iteration = _fake_run(tmp_path / "run")
    assert resolve(tmp_path / "run") == iteration
    assert resolve(tmp_path / "run" / "checkpoints") == iteration  # as before
    assert resolve(iteration) == iteration
    elsewhere = _fake_run(tmp_path / "store", step=30).parent
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "run_config.json").write_text(json.dumps(
        {"checkpoint": {"dir": "../store/checkpoints"}, "config_dir": str(tmp_path / "run2")}))
    assert resolve(tmp_path / "run2") == elsewhere / "iter_0000030"
    args = build_parser().parse_args(["export-hf", "--checkpoint", str(tmp_path / "run"),
                                      "--out", str(tmp_path / "hf")])
    from megasmol.cli import _check_inputs

    _check_inputs(args)  # accepted before anything loads


def test_a_real_run_directory_exports_and_reads(tmp_path):
    """End to end on a real checkpoint: export-hf and the reader take the run directory."""
    from megasmol.ckpt.checkpoint import read_metadata
    from megasmol.convert.export import export_hf
    from megasmol.model.init import init_checkpoint
    from tests.specs import tiny_smollm3

    init_checkpoint(tiny_smollm3(), tmp_path / "run" / "checkpoints")
    assert read_metadata(tmp_path / "run")["step"] == 0
    report = export_hf(tmp_path / "run", tmp_path / "hf", show_progress=False)
    assert (Path(report.out_dir) / "config.json").is_file()


@pytest.mark.parametrize("argv, expected", [
    (["eval", "tasks", "--checkpoint", "{hf}", "--tasks", "copa"],
     "a Hugging Face model directory (config.json), not a megasmol checkpoint; use --hf {hf}"),
    (["export-hf", "--checkpoint", "{hf}", "--out", "{tmp}/out"],
     "convert it with `megasmol import-hf --hf {hf} --out DIR`"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x"],
     "not a megasmol checkpoint itself; checkpoints below it: {tmp}/runs/demo/run/checkpoints"),
    (["chat", "--checkpoint", "{tmp}/new", "--message", "hi"],
     "a run directory whose checkpoints ({tmp}/new/checkpoints) hold none yet"),
    (["chat", "--hf", "{tmp}/runs/demo/run", "--message", "hi"],
     "this is a megasmol run directory, not a Hugging Face model directory: use --checkpoint"),
])
def test_a_wrong_directory_is_one_line_naming_what_to_give_before_any_heavy_import(
        tmp_path, argv, expected):
    """It used to take 5-12 s (torch and Megatron-Core loaded first) to say "not a megasmol
    checkpoint" with no hint, for an HF export too."""
    _fake_run(tmp_path / "runs" / "demo" / "run")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "new" / "checkpoints").mkdir(parents=True)
    fill = {"hf": str(tmp_path / "hf"), "tmp": str(tmp_path)}
    code, _, errors, seconds, imported = _cli(*[a.format(**fill) for a in argv])
    assert code == 2 and len(errors) == 1 and expected.format(**fill) in errors[0], errors
    assert not imported & HEAVY and seconds < 30, (imported & HEAVY, seconds)


# --- 2. data never built ---------------------------------------------------------------------

def test_missing_data_is_one_error_listing_each_file_once_with_the_command_that_makes_it(tmp_path):
    """Forgetting ``demo-corpus --tokenize`` listed six errors (each file once per stage), then
    the same list again in one long line, and never said how to make them."""
    code, stdout, errors, _, _ = _cli(
        "train", "--config", "examples/tiny/demo.yaml", "--set", f"run_dir={tmp_path}/run",
        "--set", f"data.root={tmp_path}/corpus/tokens")
    assert code == 2 and len(errors) == 1, errors
    assert "`megasmol demo-corpus --out " + f"{tmp_path}/corpus --tokenize`" in errors[0]
    assert "(stages stable, decay)" in errors[0]
    for domain in ("prose", "code", "math"):
        assert (stdout + errors[0]).count(f"{domain}_text_document.bin/.idx") == 1, (stdout, errors)


def test_other_missing_data_points_to_the_prepare_commands(tmp_path):
    from megasmol.data.audit import audit_plan
    from megasmol.data.recipe import plan_stages
    from tests.data_fixtures import EOS, recipe_at

    recipe = recipe_at(tmp_path, [
        {"name": "a", "start_step": 1, "datasets": [{"path": "web", "weight": 1.0}]},
        {"name": "b", "start_step": 3, "datasets": [{"path": "web", "weight": 1.0}]}])
    report = audit_plan(recipe, plan_stages(recipe, 4, 2, 8), vocab_size=100, eos_id=EOS)
    assert len(report.errors) == 1, report.errors
    assert report.errors[0].startswith(f"missing {tmp_path}/web.bin/.idx (stages a, b); ")
    assert "megasmol prepare-data --input FILES --out PREFIX" in report.errors[0]
    assert "error: missing" not in report.render(errors=False)


# --- 3. a layout in one process, pairs for prepare-chat, in-loop scoring off ------------------

def test_a_layout_one_process_cannot_hold_says_how_to_start_enough(monkeypatch):
    from megasmol.config.parallel import ParallelLayout
    from megasmol.config.typed import ConfigError

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"start 2 with `torchrun --nproc_per_node 2 -m megasmol"):
        ParallelLayout(tensor_parallel=2).check(1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"start 4 with `torchrun --nproc_per_node 4"):
        ParallelLayout(tensor_parallel=2).check(3)
    with pytest.raises(ConfigError) as planned:  # a world size being planned (pre-flight's)
        ParallelLayout(tensor_parallel=5).check(384)
    assert "torchrun" not in str(planned.value)


def test_train_with_tensor_parallel_in_one_process_fails_before_torch_loads(tmp_path):
    code, _, errors, _, imported = _cli(
        "train", "--config", "examples/tiny/demo.yaml", "--set", f"run_dir={tmp_path}/run",
        "--set", "parallel.tensor_parallel=2")
    assert code == 2 and len(errors) == 1 and "torchrun --nproc_per_node 2" in errors[0], errors
    assert not imported & HEAVY


def test_preference_pairs_given_to_prepare_chat_point_to_prepare_preferences(tmp_path):
    from megasmol.config.typed import ConfigError
    from megasmol.data.chat.prepare import prepare_chat
    from megasmol.data.chat.records import check_record

    pairs = [{"prompt": "1+1?", "chosen": "2", "rejected": "3"},
             {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
              "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(ConfigError, match=r"preference_pair=2\).*`megasmol prepare-preferences`"):
        prepare_chat([str(tmp_path / "pairs.jsonl")], str(tmp_path / "out"), show_progress=False)
    assert check_record({"text": "no messages"}, "x", "messages") == (None, "missing_messages")


def test_tasks_at_checkpoint_false_alone_turns_in_loop_scoring_off(tmp_path):
    """The demo config scores its tasks at every checkpoint; ``--set eval.tasks_at_checkpoint=false``
    was refused ("eval.tasks is set but never scored"). A task list with no schedule at all is
    still refused as a forgotten one."""
    from megasmol.config.run import load_run_config
    from megasmol.config.typed import ConfigError

    demo = REPO / "examples" / "tiny" / "demo.yaml"
    off = load_run_config(demo, ["eval.tasks_at_checkpoint=false"])
    assert off.eval.tasks and not off.eval.scores_tasks
    assert load_run_config(demo).eval.scores_tasks
    assert load_run_config(demo, ["eval.tasks_at_checkpoint=false",
                                  "eval.tasks_interval=10"]).eval.scores_tasks
    (tmp_path / "run.yaml").write_text(
        "model: smollm3-tiny\ndata: {recipe: demo}\neval: {tasks: [demo_code]}\n")
    with pytest.raises(ConfigError, match="eval.tasks is set but never scored"):
        load_run_config(tmp_path / "run.yaml")


# --- 4. the CLI itself -----------------------------------------------------------------------

def test_version_is_the_package_version(capsys):
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"megasmol {version} (megatron-core ")


def test_a_mistyped_command_or_choice_gets_the_closest_one(capsys):
    for argv, wanted in ((["trian"], "did you mean 'train'?"),
                         (["eval", "taks"], "did you mean 'tasks'?"),
                         (["plan", "layuot"], "did you mean 'layout'?"),
                         (["prepare-chat", "--input", "x", "--out", "y", "--loss-on", "asistant"],
                          "did you mean 'assistant'?")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2 and wanted in capsys.readouterr().err, argv


def test_a_mistyped_task_gets_the_closest_one_before_any_heavy_import(tmp_path):
    _fake_run(tmp_path / "run")
    for tasks, wanted in (("copa,hellaswg", "unknown task 'hellaswg' (did you mean 'hellaswag'?)"),
                          ("smollm3_bse", "(did you mean 'smollm3_base'?)"),
                          ("mmlu_cf:anatomi", "has no subset 'anatomi' (did you mean 'anatomy'?)")):
        code, _, errors, _, imported = _cli("eval", "tasks", "--checkpoint", str(tmp_path / "run"),
                                            "--tasks", tasks)
        assert code == 2 and len(errors) == 1 and wanted in errors[0], errors
        assert not imported & HEAVY, tasks


def _subcommands(parser, prefix=""):
    for action in parser._actions:  # noqa: SLF001 (argparse has no API for this)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subcommands(sub, f"{prefix}{name} ")


def test_every_command_has_a_description_paragraph():
    commands = dict(_subcommands(build_parser()))
    assert len(commands) >= 26
    bare = [name for name, sub in commands.items() if not sub.description]
    assert not bare, f"give these add_parser(..., description=...): {bare}"


def test_eval_commands_show_checkpoint_or_hf_as_one_of_and_say_what_tasks_score():
    commands = dict(_subcommands(build_parser()))
    for name in ("eval tasks", "eval passkey", "chat"):
        assert "(--checkpoint CHECKPOINT | --hf HF)" in commands[name].format_usage(), name
    summary = next(a for a in build_parser()._actions  # noqa: SLF001
                   if isinstance(a, argparse._SubParsersAction)).choices["eval"].format_help()  # noqa: SLF001
    assert "free generation, code" in summary
    description = commands["eval tasks"].description
    assert "free-generation tasks" in description and "pass@1" in description


def test_plan_fertility_names_the_bundled_tokenizer():
    fertility = dict(_subcommands(build_parser()))["plan fertility"]
    tokenizer = next(a for a in fertility._actions if a.dest == "tokenizer")  # noqa: SLF001
    assert "llama3.2" in tokenizer.help and "bundled" in tokenizer.help


@pytest.mark.parametrize("error, code", [("input", 2), ("failure", 1), ("bug", None)])
def test_only_megasmols_own_errors_are_one_line(monkeypatch, capsys, error, code):
    """A user error is one line and exit 2, a run that cannot go on one line and exit 1; a bare
    ValueError is a bug in megasmol and keeps its traceback."""
    from megasmol import cli
    from megasmol.errors import InputError, RunFailure

    raised = {"input": InputError("--lengths: 'x' is not a token count"),
              "failure": RunFailure("loss spike at step 3 after 5 rollbacks"),
              "bug": ValueError("an internal shape mismatch")}[error]
    parser = build_parser()

    def failing(args):
        raise raised

    parse = parser.parse_args
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(
        **{**vars(parse(argv)), "func": failing}))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    if code is None:
        with pytest.raises(ValueError, match="an internal shape mismatch"):
            main(["info"])
        return
    assert main(["info"]) == code
    assert capsys.readouterr().err == f"megasmol info: error: {raised}\n"
