"""Which evaluation tasks carry signal: the playbook's four criteria, from in-loop evaluations.

For each downstream metric, over the compared runs:

* monotonicity: Spearman's rank correlation of the score with training tokens, per run, averaged
  (sign flipped for lower-is-better metrics, so higher is always better);
* noise: the standard deviation of the final score across seeds, pooled over experiments that
  have several seeds;
* signal above chance: (mean final score - chance level) / noise, for metrics with a chance level;
* ranking consistency: Kendall's tau between the experiments' ranking at the earliest evaluation
  they all have and at the last.

A verdict names what fails (thresholds below) or says ``good``; a criterion that cannot be
computed (one seed, no chance level, fewer than three experiments) says so instead of passing.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from megasmol.ablate.compare import Comparison, lower_is_better

MIN_MONOTONICITY = 0.5
"""Mean Spearman correlation below this: the score does not improve steadily with training."""
MIN_SIGNAL_UNITS = 3.0
"""Distance from chance below this many seed standard deviations: indistinguishable from random."""
MIN_RANK_TAU = 0.5
"""Kendall's tau below this: early rankings do not predict final ones."""
MIN_POINTS = 3
"""Evaluations a run needs before its monotonicity counts."""


@dataclass
class TaskQuality:
    metric: str
    monotonicity: Optional[float]
    noise: Optional[float]
    signal: Optional[float]
    rank_tau: Optional[float]
    rank_steps: Optional[tuple[int, int]]
    chance: Optional[float]

    def verdict(self, experiments: int) -> str:
        problems, unknown = [], []
        if self.monotonicity is None:
            unknown.append("monotonicity")
        elif self.monotonicity < MIN_MONOTONICITY:
            problems.append("not monotonic")
        if self.signal is not None and self.signal < MIN_SIGNAL_UNITS:
            problems.append("at chance" if self.signal < 1 else "weak signal")
        elif self.signal is None:
            unknown.append("signal")
        if experiments < 3:
            unknown.append("ranking needs 3+ experiments")
        elif self.rank_tau is None:
            unknown.append("ranking")
        elif self.rank_tau < MIN_RANK_TAU:
            problems.append("unstable ranking")
        if problems:
            return ", ".join(problems)
        return "good" if not unknown else "good so far (not judged: " + ", ".join(unknown) + ")"


def _mean_spearman(comparison: Comparison, metric: str) -> Optional[float]:
    from scipy.stats import spearmanr

    values = []
    for experiment in comparison.experiments:
        for run in experiment.runs:
            points = [(run.tokens_at(r["step"]), r[metric]) for r in run.downstream
                      if r.get(metric) is not None]
            if len(points) < MIN_POINTS or len({y for _, y in points}) < 2:
                continue
            rho = spearmanr([x for x, _ in points], [y for _, y in points]).statistic
            if math.isfinite(rho):
                values.append(-rho if lower_is_better(metric) else rho)
    return statistics.fmean(values) if values else None


def _seed_noise(comparison: Comparison, metric: str) -> Optional[float]:
    variances = [e.columns[metric].std ** 2 for e in comparison.experiments
                 if metric in e.columns and e.columns[metric].std is not None]
    return math.sqrt(statistics.fmean(variances)) if variances else None


def _scores_at(experiment, metric: str, step: int) -> Optional[float]:
    values = [r[metric] for run in experiment.runs for r in run.downstream
              if r["step"] == step and r.get(metric) is not None]
    return statistics.fmean(values) if values else None


def _rank_consistency(comparison: Comparison, metric: str):
    from scipy.stats import kendalltau

    step_sets = [{r["step"] for run in e.runs for r in run.downstream if r.get(metric) is not None}
                 for e in comparison.experiments]
    if len(step_sets) < 2 or not all(step_sets):
        return None, None
    common = sorted(set.intersection(*step_sets))
    if len(common) < 2:
        return None, None
    early, last = common[0], common[-1]
    first = [_scores_at(e, metric, early) for e in comparison.experiments]
    final = [_scores_at(e, metric, last) for e in comparison.experiments]
    tau = kendalltau(first, final).statistic
    return (tau if math.isfinite(tau) else None), (early, last)


def task_quality(comparison: Comparison) -> list[TaskQuality]:
    rows = []
    for metric in comparison.metrics:
        noise = _seed_noise(comparison, metric)
        chance = comparison.chance(metric)
        signal = None
        finals = [e.columns[metric].mean for e in comparison.experiments if metric in e.columns]
        if chance is not None and noise and finals:
            signal = (statistics.fmean(finals) - chance) / noise
        tau, steps = _rank_consistency(comparison, metric)
        rows.append(TaskQuality(metric, _mean_spearman(comparison, metric), noise, signal, tau,
                                steps, chance))
    return rows


def quality_rows(rows: list[TaskQuality], experiments: int) -> list[list[str]]:
    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    table = [["metric", "monotonicity (ρ)", "seed noise (σ)", "above chance (σ)",
              "ranking (τ, steps)", "verdict"]]
    for q in rows:
        ranking = "-" if q.rank_tau is None else f"{q.rank_tau:.2f} ({q.rank_steps[0]}→{q.rank_steps[1]})"
        table.append([q.metric, fmt(q.monotonicity), fmt(q.noise, ".4f"), fmt(q.signal, ".1f"),
                      ranking, q.verdict(experiments)])
    return table
