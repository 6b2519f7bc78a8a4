"""``compare`` counts diverged runs: per experiment (over its seeds) and per value of a config
field (``--by optim.name``), from the run's own ``diverged`` marker or a non-finite loss."""

import json

from megasmol.ablate.compare import load_comparison
from megasmol.ablate.runlog import read_run
from megasmol.runtime.run_dir import Kind
from megasmol.train.metrics import strict_json_record
from tests.conftest import run_cli
from tests.train_fixtures import train, write_training_run


def test_a_diverged_seed_is_counted_per_experiment_and_per_field(tmp_path):
    sections = {"eval": {"interval": 0}, "spikes": {"max_nonfinite_steps": 2},
                "checkpoint": {"interval": 0, "save_at_end": False}}
    config = write_training_run(tmp_path, steps=4, **sections)
    runs = []
    for seed, fault in ((7, None), (8, "inf_grad:2-3")):
        out = train(config, f"training.seed={seed}", f"run_dir={tmp_path / f'lr-seed{seed}'}", check=False,
                    env_extra={"MEGASMOL_FAULT": fault} if fault else None)
        assert (out.returncode != 0) == (fault is not None), out.stderr[-2000:]
        runs.append(tmp_path / f"lr-seed{seed}")
    markers = [r for r in map(json.loads, (runs[1] / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == Kind.DIVERGED]
    assert len(markers) == 1 and "non-finite" in markers[0]["reason"]
    assert read_run(runs[0]).diverged is None
    assert read_run(runs[1]).diverged.startswith("stopped at step ")
    assert "non-finite" in read_run(runs[1]).diverged

    comparison = load_comparison(runs)
    (experiment,) = comparison.experiments  # the seeds are one experiment
    assert experiment.diverged == 1
    header, row = comparison.table_rows()
    assert header[-1] == "diverged" and row[-1] == "1/2"
    assert comparison.divergence_rows("optim.name") == [["optim.name", "runs", "diverged"],
                                                        ["adamw", "2", "1"]]

    out = run_cli("compare", *map(str, runs), "--by", "optim.name", "--out", str(tmp_path / "cmp"))
    assert "runs diverged, by optim.name" in out.stdout
    assert [line.split() for line in out.stdout.splitlines() if line.startswith("adamw")] == [
        ["adamw", "2", "1"]]
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert list(summary["experiments"][0]["diverged"]) == [str(runs[1])]
    bad = run_cli("compare", *map(str, runs), "--by", "optim.nope", check=False)
    assert bad.returncode != 0 and "--by optim.nope" in bad.stderr


def test_a_non_finite_loss_counts_and_clean_runs_show_no_column(tmp_path):
    def write(name, losses):
        run = tmp_path / name
        run.mkdir()
        lines = [json.dumps({**strict_json_record({"step": s, "loss": loss}), "kind": Kind.TRAIN},
                            allow_nan=False) for s, loss in enumerate(losses, 1)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return run

    assert read_run(write("nan", [3.0, float("nan"), 2.0])).diverged == "non-finite loss at step 2"
    assert read_run(write("inf", [3.0, float("inf")])).diverged == "non-finite loss at step 2"
    clean = load_comparison([write("a", [3.0, 2.0]), write("b", [3.0, 2.5])])
    assert "diverged" not in clean.table_rows()[0]
