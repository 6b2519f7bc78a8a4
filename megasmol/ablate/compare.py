"""``megasmol compare``: runs side by side, with seeds folded into mean ± standard deviation.

The summary has one row per experiment (a group of runs that differ only by seed): final and
best training loss, validation loss, every downstream metric at its last evaluation, training
tokens and throughput; for preference runs the held-out reward accuracy and margin, for RL runs
the final reward, each reward function's mean and the completions' mean length. With a
baseline, each experiment's difference from it is given in units of the seed noise, so a
difference can be judged against noise. Divergences are counted beside them: per experiment
(``diverged`` k/n over its seeds, shown once any run diverged) and, with ``--by FIELD``, per value
of a config field across everything else that varies (per optimizer across its LRs and seeds).
A run counts as diverged by its own ``diverged`` marker or a non-finite loss (``runlog.py``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmol.ablate.runlog import RunLog, group_by_seed, read_run
from megasmol.config.typed import ConfigError

LOWER_IS_BETTER = ("loss", "bpb")
CHANCE_METRICS = ("acc", "acc_norm", "exact_match")


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1] in LOWER_IS_BETTER or metric.endswith("loss")


@dataclass
class Spread:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int = 4) -> str:
        if not self.values:
            return "-"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Experiment:
    name: str
    runs: list[RunLog]
    columns: dict[str, Spread] = field(default_factory=dict)

    @property
    def diverged(self) -> int:
        """How many of its runs diverged."""
        return sum(run.diverged is not None for run in self.runs)


def config_value(run: RunLog, dotted: str):
    """``section.field`` of the run's resolved config (``model.FIELD``: of its spec when the
    config names a spec file); ``KeyError`` when it has none."""
    from megasmol.config.identity import model_identity

    node = dict(run.config or {})
    node["model"] = model_identity(node.get("model"))
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


# Preference runs (DPO / APO): the held-out reward metrics, TRL's names, at the last validation.
PREFERENCE_COLUMNS = {"val reward acc": "rewards/accuracies", "val reward margin": "rewards/margins"}
# RL runs (GRPO family): the last logged step's rollout metrics, TRL's names; each reward
# function's own mean (``rewards/NAME/mean``) gets a ``reward NAME`` column after ``reward``.
RL_COLUMNS = {"reward": "reward", "completion length": "completions/mean_length"}
RL_REWARD_PREFIX = "reward "


def _rl_values(run: RunLog) -> dict[str, float]:
    """An RL run's final rollout metrics by column (nothing for other runs)."""
    rollouts = [r for r in run.train if r.get("reward") is not None]
    if not rollouts:
        return {}
    last = rollouts[-1]
    values = {column: last[key] for column, key in RL_COLUMNS.items() if last.get(key) is not None}
    for key, value in last.items():
        if key.startswith("rewards/") and key.endswith("/mean") and value is not None:
            values[RL_REWARD_PREFIX + key[len("rewards/"):-len("/mean")]] = value
    return values


def _final_values(run: RunLog, metrics: list[str]) -> dict[str, float]:
    values = {}
    losses = [r["loss"] for r in run.train if r.get("loss") is not None]
    if losses:
        values["final loss"] = losses[-1]
        values["best loss"] = min(losses)
    if run.validation:
        values["val loss"] = run.validation[-1]["loss"]
        for column, key in PREFERENCE_COLUMNS.items():
            if run.validation[-1].get(key) is not None:
                values[column] = run.validation[-1][key]
    for metric in metrics:
        last = [r[metric] for r in run.downstream if r.get(metric) is not None]
        if last:
            values[metric] = last[-1]
    values.update(_rl_values(run))
    tokens = [r["consumed_tokens"] for r in run.train if "consumed_tokens" in r]
    if tokens:
        values["tokens"] = tokens[-1]
    speed = [r["tokens_per_s"] for r in run.train if r.get("tokens_per_s")]
    if speed:
        values["tokens/s"] = statistics.median(speed)
    return values


@dataclass
class Comparison:
    experiments: list[Experiment]
    metrics: list[str]
    baseline: Optional[str] = None

    def column_names(self) -> list[str]:
        per_reward = sorted({c for e in self.experiments for c in e.columns
                             if c.startswith(RL_REWARD_PREFIX)})
        names = ["final loss", "best loss", "val loss", *PREFERENCE_COLUMNS, "reward", *per_reward,
                 "completion length", "tokens", "tokens/s"]
        return [n for n in names if any(n in e.columns for e in self.experiments)]

    def chance(self, metric: str) -> Optional[float]:
        """The chance level the runs logged for ``metric``'s task, for metrics that are a share
        of correct answers (accuracy, exact match); None for the others."""
        if metric.split("/")[-1] not in CHANCE_METRICS:
            return None
        return next((c for e in self.experiments for r in e.runs
                     if (c := r.chance(metric)) is not None), None)

    def metric_rows(self) -> list[list[str]]:
        """Downstream metrics at each run's last evaluation: one row per metric, one column per
        experiment (mean ± std over seeds)."""
        rows = [["metric", "chance", *(e.name for e in self.experiments)]]
        for metric in self.metrics:
            chance = self.chance(metric)
            rows.append([metric, f"{chance:.2f}" if chance is not None else "-",
                         *(e.columns[metric].text() if metric in e.columns else "-"
                           for e in self.experiments)])
        return rows

    def noise_units(self, experiment: Experiment, column: str) -> Optional[float]:
        """(experiment - baseline) / pooled seed std, signed so that positive is better."""
        base = next(e for e in self.experiments if e.name == self.baseline)
        if column not in experiment.columns or column not in base.columns:
            return None
        stds = [s for s in (experiment.columns[column].std, base.columns[column].std) if s]
        if not stds:
            return None
        noise = math.sqrt(sum(s * s for s in stds) / len(stds))
        diff = experiment.columns[column].mean - base.columns[column].mean
        return (-diff if lower_is_better(column) else diff) / noise if noise > 0 else None

    def any_diverged(self) -> bool:
        return any(e.diverged for e in self.experiments)

    def divergence_rows(self, dotted: str) -> list[list[str]]:
        """Runs and diverged runs per value of config field ``dotted``, over all compared runs."""
        by_value: dict[str, list[RunLog]] = {}
        for run in (r for e in self.experiments for r in e.runs):
            try:
                value = config_value(run, dotted)
            except KeyError:
                raise ConfigError(f"--by {dotted}: run {run.path} has no such config field "
                                  "(give section.field, e.g. optim.name)") from None
            by_value.setdefault(str(value), []).append(run)
        rows = [[dotted, "runs", "diverged"]]
        for value, runs in by_value.items():
            rows.append([value, str(len(runs)), str(sum(r.diverged is not None for r in runs))])
        return rows

    def table_rows(self) -> list[list[str]]:
        columns = self.column_names()
        header = ["experiment", "seeds", *columns]
        if self.any_diverged():
            header.append("diverged")
        if self.baseline:
            header.append("vs baseline: final loss in seed-noise σ (+ better, * 2σ+)")
        rows = [header]
        for experiment in self.experiments:
            row = [experiment.name + (" (baseline)" if experiment.name == self.baseline else ""),
                   str(len(experiment.runs))]
            for column in columns:
                spread = experiment.columns.get(column)
                if spread is None:
                    row.append("-")
                elif column in ("tokens", "tokens/s"):
                    row.append(f"{spread.mean:,.0f}")
                else:
                    row.append(spread.text())
            if self.any_diverged():
                row.append(f"{experiment.diverged}/{len(experiment.runs)}")
            if self.baseline:
                units = (None if experiment.name == self.baseline
                         else self.noise_units(experiment, "final loss"))
                row.append("-" if units is None else f"{units:+.1f}σ" + (" *" if abs(units) >= 2 else ""))
            rows.append(row)
        return rows


def load_comparison(run_dirs: list[str | Path], baseline: Optional[str] = None) -> Comparison:
    if not run_dirs:
        raise ConfigError("compare: name at least one run directory")
    runs = [read_run(p) for p in run_dirs]
    if not any(run.train or run.validation or run.downstream for run in runs):
        raise ConfigError("compare: no run has logged a step yet (every metrics.jsonl is empty): "
                          + ", ".join(str(p) for p in run_dirs))
    groups = group_by_seed(runs)
    metrics = sorted({m for run in runs for m in run.metric_names()})
    experiments = []
    for name, members in groups.items():
        experiment = Experiment(name, members)
        per_run = [_final_values(run, metrics) for run in members]
        for column in {c for values in per_run for c in values}:
            experiment.columns[column] = Spread([v[column] for v in per_run if column in v])
        experiments.append(experiment)
    if baseline is not None:
        wanted = Path(baseline).name
        match = [e for e in experiments if e.name == baseline or e.name == wanted
                 or any(r.name == wanted or r.path.resolve() == Path(baseline).resolve() for r in e.runs)]
        if not match:
            raise ConfigError(f"--baseline {baseline}: not one of the compared runs "
                              f"({', '.join(e.name for e in experiments)})")
        baseline = match[0].name
    return Comparison(experiments, metrics, baseline)


def run_directories(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """The run directories ``paths`` name, and a note for each path that is not one.

    An ablation grid's directory (``megasmol ablate --out``) stands for its runs. What a shell glob
    over a grid adds besides its runs (``manifest.json``, ``configs.txt``, the scripts, a
    ``compare`` output folder) is left out with a note; a directory that is none of these is
    passed on, so a run that has not started yet is an error naming it."""
    from megasmol.ablate.grid import MANIFEST
    from megasmol.runtime.run_dir import RunDir

    def started(run: Path) -> bool:
        return RunDir(run).metrics.is_file()

    runs: list[Path] = []
    notes: list[str] = []
    others: list[str] = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file() and not started(path):
            listed = [Path(run["run_dir"]) for run in json.loads((path / MANIFEST).read_text())["runs"]]
            runs += [run for run in listed if started(run)]
            waiting = [run.name for run in listed if not started(run)]
            if waiting:
                notes.append(f"{path}: left out {len(waiting)} run(s) not started yet: {', '.join(waiting)}")
        elif path.is_file() or (path / "comparison.json").is_file():
            others.append(path.name)
        else:
            runs.append(path)
    if others:
        notes.append(f"left out what is not a run directory: {', '.join(others)}")
    return runs, notes


def default_out(run_dirs: list[str | Path]) -> Path:
    parents = {Path(p).resolve().parent for p in run_dirs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare"
