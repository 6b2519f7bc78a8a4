"""Ablation grids (``megasmol ablate``) and their comparison (``megasmol compare``), including the
evaluation-task quality table computed from in-loop evaluations."""

import json
import os
import shlex
import subprocess

import pytest
import yaml

from megasmol.ablate.compare import load_comparison
from megasmol.ablate.grid import Variation, closest_depth, parse_vary, plan_grid
from megasmol.ablate.task_quality import task_quality
from megasmol.cli import main
from megasmol.config.run import load_run_config
from megasmol.config.typed import ConfigError
from megasmol.model.flops import parameter_count
from megasmol.model.spec import load_model_spec
from tests.conftest import REPO, run_cli
from tests.train_fixtures import step_losses, write_training_run


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two learning rates x two seeds, six steps each, trained by ``megasmol ablate --run``."""
    root = tmp_path_factory.mktemp("ablate")
    base = write_training_run(root / "base", steps=6, eval={"interval": 3, "steps": 1},
                              checkpoint={"interval": 0})
    out = run_cli("ablate", "--config", str(base), "--vary", "schedule.lr=0.01,0.002", "--seeds", "2",
                  "--set", "schedule.warmup_steps=1", "--out", str(root / "grid"), "--run", "--quiet")
    return root, out


def _cli(capsys, *args) -> str:
    """The command in this process (no interpreter start-up); its stdout."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_a_grid_writes_named_configs_runs_them_and_skips_finished_ones(grid, capsys):
    root, out = grid
    manifest = json.loads((root / "grid" / "manifest.json").read_text())
    names = [r["name"] for r in manifest["runs"]]
    assert names == ["lr=0.01_seed=7", "lr=0.01_seed=8", "lr=0.002_seed=7", "lr=0.002_seed=8"]
    assert "trained 4, skipped 0" in out.stdout
    for run in manifest["runs"]:
        config = load_run_config(run["config"])  # relative paths still reach the base's files
        assert config.schedule.lr == run["changes"]["schedule.lr"]
        assert config.training.seed == run["seed"] and config.schedule.warmup_steps == 1
        assert config.path(config.run_dir) == root / "grid" / run["name"]
        assert json.loads((root / "grid" / run["name"] / "result.json").read_text())["last_step"] == 6
    losses = {n: step_losses(root / "grid" / n) for n in names}
    assert losses[names[0]] != losses[names[1]]  # the seeds differ
    assert (root / "grid" / "configs.txt").read_text().splitlines() == [r["config"] for r in manifest["runs"]]

    again = _cli(capsys, "ablate", "--config", str(root / "base" / "run.yaml"), "--vary",
                 "schedule.lr=0.01,0.002", "--seeds", "2", "--set", "schedule.warmup_steps=1",
                 "--out", str(root / "grid"), "--run", "--quiet")
    assert "trained 0, skipped 4" in again
    assert step_losses(root / "grid" / names[0]) == losses[names[0]]


def test_compare_folds_seeds_into_mean_and_spread_and_plots(grid, capsys):
    root, _ = grid
    dirs = sorted(str(p) for p in (root / "grid").glob("lr=*"))
    out = _cli(capsys, "compare", *dirs, "--baseline", "lr=0.002", "--out", str(root / "cmp"))
    lines = out.splitlines()
    assert any(line.startswith("lr=0.002 (baseline)") for line in lines)
    row = next(line for line in lines if line.startswith("lr=0.01 "))
    final = [step_losses(root / "grid" / f"lr=0.01_seed={s}")[6] for s in (7, 8)]
    mean = sum(final) / 2
    assert f"{mean:.4f} ± " in row and row.split()[1] == "2"
    summary = json.loads((root / "cmp" / "comparison.json").read_text())
    experiment = next(e for e in summary["experiments"] if e["name"] == "lr=0.01")
    assert experiment["final loss"]["values"] == pytest.approx(final)
    assert experiment["tokens"]["mean"] == 6 * 8 * 64
    for plot in ("loss.png", "validation_loss.png"):
        assert (root / "cmp" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_takes_the_grid_directory_or_a_glob_over_it(grid, capsys):
    """`compare runs/grid` compares the grid's runs; `compare runs/grid/*` (the shell adds the
    manifest, the scripts and an earlier compare folder) leaves out, with a note, what is not a
    run, and gives the same table."""
    root, _ = grid
    whole = _cli(capsys, "compare", str(root / "grid"), "--baseline", "lr=0.002")
    assert (root / "grid" / "compare" / "comparison.json").is_file()  # the grid's own compare folder
    globbed = _cli(capsys, "compare", *sorted(map(str, (root / "grid").iterdir())), "--baseline", "lr=0.002")
    note, *table = globbed.splitlines()
    assert note.startswith("note: left out what is not a run directory: ")
    assert {"compare", "configs.txt", "manifest.json"} <= set(note.split(": ", 2)[2].split(", "))
    assert sorted(table[:4]) == sorted(whole.splitlines()[:4])  # the same two experiments
    assert sum(line.startswith("lr=0.0") for line in table[:4]) == 2


def test_seeds_of_a_model_ablation_are_one_experiment(tmp_path):
    """`--vary model.FIELD` writes a model.yaml beside each run's config: two seeds' copies of the
    same spec are one experiment, another spec is another."""
    from megasmol.config.identity import experiment_key

    keys = []
    for name, heads, seed in (("kv1_seed=1", 1, 1), ("kv1_seed=2", 1, 2), ("kv4_seed=1", 4, 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.yaml").write_text(f"name: tiny\nnum_kv_heads: {heads}\n")
        keys.append(experiment_key({"model": str(tmp_path / name / "model.yaml"),
                                    "run_dir": str(tmp_path / name), "training": {"seed": seed}}))
    assert keys[0] == keys[1] != keys[2]


def _synthetic_run(path, lr, seed, scores):
    """A run directory as the trainer leaves it: run_config.json and metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "run_config.json").write_text(json.dumps(
        {"schedule": {"lr": lr}, "training": {"seed": seed, "train_steps": 40}, "run_dir": str(path)}))
    records = [{"kind": "train", "step": s, "loss": 5.0 - lr * s, "consumed_tokens": 1000 * s,
                "tokens_per_s": 100.0} for s in range(10, 41, 10)]
    for step, values in scores.items():
        records.append({"kind": "downstream", "step": step, "consumed_tokens": 1000 * step,
                        **{f"{task}/acc": v for task, v in values.items()},
                        **{f"{task}/chance": 0.25 for task in values}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_task_quality_applies_the_playbooks_four_criteria(tmp_path, capsys):
    import random

    rng = random.Random(0)
    dirs = []
    for k, lr in enumerate((0.001, 0.002, 0.003), start=1):
        for seed, jitter in ((1, -0.002), (2, 0.002)):
            scores = {s: {"steady": 0.25 + 0.05 * k * s / 10 + jitter,  # rises, ranks kept, low noise
                          "random": 0.25 + rng.uniform(-0.02, 0.02)}     # noise around chance
                      for s in (10, 20, 30, 40)}
            dirs.append(tmp_path / f"lr={lr}_seed={seed}")
            _synthetic_run(dirs[-1], lr, seed, scores)
    comparison = load_comparison(dirs)
    assert [len(e.runs) for e in comparison.experiments] == [2, 2, 2]
    quality = {q.metric: q for q in task_quality(comparison)}
    steady, noisy = quality["steady/acc"], quality["random/acc"]
    assert steady.monotonicity == pytest.approx(1.0)
    assert steady.noise == pytest.approx((0.004 ** 2 / 2) ** 0.5)  # stdev of ±0.002 pairs
    finals = [0.25 + 0.05 * k * 4 for k in (1, 2, 3)]
    assert steady.signal == pytest.approx((sum(finals) / 3 - 0.25) / steady.noise)
    assert steady.rank_tau == pytest.approx(1.0) and steady.rank_steps == (10, 40)
    assert steady.verdict(3) == "good"
    assert steady.verdict(2) == "good so far (not judged: ranking needs 3+ experiments)"
    assert "at chance" in noisy.verdict(3) or "weak signal" in noisy.verdict(3)
    assert noisy.monotonicity < 0.5 and "not monotonic" in noisy.verdict(3)

    out = _cli(capsys, "compare", *map(str, dirs), "--out", str(tmp_path / "cmp"), "--x", "steps")
    assert "downstream metrics" in out and "evaluation-task quality" in out
    quality_table = out.split("evaluation-task quality")[1]
    row = next(line for line in quality_table.splitlines() if line.startswith("steady/acc"))
    assert row.rstrip().endswith("good")
    assert (tmp_path / "cmp" / "eval_steady_acc.png").is_file()


def test_match_params_picks_the_closest_depth(tmp_path):
    base = write_training_run(tmp_path / "base", steps=4)
    grid = plan_grid(base, [parse_vary("model.num_kv_heads=1,4"), parse_vary("model.ffn_hidden_size=32")],
                     tmp_path / "grid", match_params=True)
    target = grid.base_params
    for run in grid.runs:
        spec = load_model_spec(run.config.parent / "model.yaml")
        assert spec.num_layers == run.matched_layers
        counts = []
        for n in range(1, 17):
            try:
                counts.append(parameter_count(spec.replace(num_layers=n)).total)
            except ConfigError:  # NoPE every 4th layer: depths that are multiples of 4
                pass
        best = min(abs(c - target) for c in counts)
        assert abs(parameter_count(spec).total - target) == best
        assert run.params == parameter_count(spec).total
    assert any(run.matched_layers != grid.base_layers for run in grid.runs)  # smaller FFN: deeper
    layers, _ = closest_depth(load_model_spec("smollm3-3b").replace(num_kv_heads=16),
                              parameter_count(load_model_spec("smollm3-3b")).total)
    assert layers < 36  # more KV heads cost parameters: fewer layers match the 3B


def test_bad_grids_are_named(tmp_path):
    base = write_training_run(tmp_path / "base", steps=4)
    with pytest.raises(ConfigError, match="not a model spec field"):
        plan_grid(base, [Variation("model.kv_heads", [1, 2])], tmp_path / "g1")
    with pytest.raises(ConfigError, match="schedule.lrr"):
        plan_grid(base, [Variation("schedule.lrr", [1e-3])], tmp_path / "g2")
    with pytest.raises(ConfigError, match="num_attention_heads"):
        plan_grid(base, [parse_vary("model.num_kv_heads=3")], tmp_path / "g3")
    with pytest.raises(ConfigError, match="expected section.field"):
        parse_vary("schedule.lr")
    with pytest.raises(ConfigError, match="--seeds"):
        parse_vary("training.seed=1,2")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        plan_grid(base, [Variation("schedule.lr", [1e-3])], tmp_path / "afile")


def test_slurm_array_runs_one_config_per_task(tmp_path, capsys):
    base = write_training_run(tmp_path / "base", steps=4)
    out = _cli(capsys, "ablate", "--config", str(base), "--vary", "schedule.lr=0.01,0.002,0.001",
               "--out", str(tmp_path / "grid"), "--slurm")
    assert "submit the Slurm array with" in out
    submit = (tmp_path / "grid" / "submit.sh").read_text()
    assert "--array=0-2" in submit and "examples/slurm/ablate.sbatch" in submit
    env = {**os.environ, "DRY_RUN": "1", "GRID": str(tmp_path / "grid"), "SLURM_ARRAY_TASK_ID": "1"}
    proc = subprocess.run(["bash", str(REPO / "examples/slurm/ablate.sbatch")], env=env, text=True,
                          capture_output=True, check=True)
    cmd = shlex.split(proc.stdout.splitlines()[0])
    second = (tmp_path / "grid" / "configs.txt").read_text().splitlines()[1]
    assert cmd[0] == "srun" and cmd[cmd.index("--config") + 1] == second
    assert yaml.safe_load(open(second))["schedule"]["lr"] == 0.002


def test_compare_names_what_it_cannot_read(tmp_path):
    _synthetic_run(tmp_path / "ok", 0.001, 1, {10: {"t": 0.3}})
    with (tmp_path / "ok" / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "step": 50, "lo')  # killed mid-write: ignored
    assert load_comparison([tmp_path / "ok"]).experiments[0].columns["final loss"].values == [5.0 - 0.04]
    _synthetic_run(tmp_path / "bad", 0.001, 2, {10: {"t": 0.3}})
    lines = (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "bad" / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(ConfigError, match=r"bad/metrics.jsonl:1: not valid JSON"):
        load_comparison([tmp_path / "bad"])
    with pytest.raises(ConfigError, match="not a run directory"):
        load_comparison([tmp_path])
    with pytest.raises(ConfigError, match="--baseline nope"):
        load_comparison([tmp_path / "ok"], baseline="nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no run has logged a step yet"):
        load_comparison([tmp_path / "empty"])


def _synthetic_rl_run(path, l_max, seed, lengths):
    """An RL run directory as the trainer leaves it: per step the rollout metrics (TRL's names)."""
    path.mkdir(parents=True)
    (path / "run_config.json").write_text(json.dumps(
        {"rewards": {"overlong": {"l_max": l_max}}, "training": {"seed": seed}, "run_dir": str(path)}))
    records = []
    for step, length in enumerate(lengths, start=1):
        math_mean = 0.1 * step + 0.01 * seed
        penalty = -0.5 if length > l_max else 0.0
        records.append({"kind": "train", "step": step, "loss": 0.01 * step, "consumed_tokens": 100 * step,
                        "tokens_per_s": 50.0, "reward": math_mean + penalty, "reward_std": 0.3,
                        "rewards/math/mean": math_mean, "rewards/overlong/mean": penalty,
                        "completions/mean_length": float(length), "completions/min_length": length - 5.0,
                        "completions/max_length": length + 5.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_shows_rl_rewards_and_completion_lengths(tmp_path, capsys):
    """RL runs get the last step's reward, each reward's mean and the mean completion length as
    columns (seeds folded), and reward and completion-length plots; a run without rollouts has none."""
    runs = [tmp_path / "lmax=16_seed=1", tmp_path / "lmax=16_seed=2", tmp_path / "lmax=8_seed=1"]
    _synthetic_rl_run(runs[0], 16, 1, [10, 12, 14])
    _synthetic_rl_run(runs[1], 16, 2, [10, 12, 13])
    _synthetic_rl_run(runs[2], 8, 1, [10, 9, 7])
    _synthetic_run(tmp_path / "pretrain", 0.001, 1, {})
    comparison = load_comparison([*runs, tmp_path / "pretrain"])
    by_name = {e.name: e for e in comparison.experiments}
    assert set(by_name) == {"lmax=16", "lmax=8_seed=1", "pretrain"}
    wide = by_name["lmax=16"].columns
    assert wide["reward"].values == pytest.approx([0.31, 0.32])
    assert wide["reward math"].values == pytest.approx([0.31, 0.32])
    assert wide["reward overlong"].values == [0.0, 0.0]
    assert wide["completion length"].values == [14.0, 13.0]
    assert by_name["lmax=8_seed=1"].columns["completion length"].values == [7.0]
    assert "reward" not in by_name["pretrain"].columns
    header = comparison.table_rows()[0]
    assert header[header.index("final loss"):] == [
        "final loss", "best loss", "reward", "reward math", "reward overlong", "completion length",
        "tokens", "tokens/s"]
    out = _cli(capsys, "compare", *map(str, runs), "--out", str(tmp_path / "cmp"), "--x", "steps")
    assert "completion length" in out and "13.5000 ± 0.7071" in out
    assert "reward.png" in out and "completion_length.png" in out
    assert (tmp_path / "cmp" / "completion_length.png").stat().st_size > 0
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert summary["experiments"][0]["reward math"]["values"] == pytest.approx([0.31, 0.32])
