"""PNG plots of compared runs (matplotlib): one line per experiment against tokens or steps;
an experiment with several seeds is drawn as its mean with a band from the lowest to the
highest seed."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from megasmol.ablate.compare import Comparison
from megasmol.ablate.runlog import RunLog
from megasmol.utils.plot import figure, readable_axes, save_figure

Series = Callable[[RunLog], list[tuple[int, float]]]  # (step, value) pairs of one run


def _train_loss(run: RunLog) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in run.train if r.get("loss") is not None]


def _validation_loss(run: RunLog) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in run.validation if r.get("loss") is not None]


def _train_metric(key: str) -> Series:
    return lambda run: [(r["step"], r[key]) for r in run.train if r.get(key) is not None]


def _downstream(metric: str) -> Series:
    return lambda run: [(r["step"], r[metric]) for r in run.downstream if r.get(metric) is not None]


def _figure(comparison: Comparison, series: Series, *, x: str, title: str, y_label: str,
            path: Path, chance: Optional[float] = None, log_y: bool = False,
            band: Optional[tuple[Series, Series]] = None) -> Optional[Path]:
    """One line per experiment (its seeds' mean); the band spans its seeds' lowest to highest
    value, or with ``band`` (low, high series) the lowest low to the highest high over its seeds."""
    fig, ax = figure()
    drawn = False
    for experiment in comparison.experiments:
        per_run = [dict(series(run)) for run in experiment.runs]
        steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
        if not steps:
            continue
        runs = experiment.runs
        xs = [runs[0].tokens_at(s) if x == "tokens" else s for s in steps]
        means = [statistics.fmean(p[s] for p in per_run) for s in steps]
        label = experiment.name + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
        line, = ax.plot(xs, means, label=label, linewidth=1.6)
        lows, highs = ((per_run, per_run) if band is None else
                       ([dict(band[0](run)) for run in runs], [dict(band[1](run)) for run in runs]))
        if (len(runs) > 1 or band is not None) and all(s in p for p in lows + highs for s in steps):
            low = [min(p[s] for p in lows) for s in steps]
            high = [max(p[s] for p in highs) for s in steps]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    readable_axes(ax, log_y=log_y, engineering_x=x == "tokens")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_title(title)
    ax.set_xlabel("training tokens" if x == "tokens" else "step")
    ax.set_ylabel(y_label)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_plots(comparison: Comparison, out: Path, x: str = "tokens") -> list[Path]:
    """loss.png, validation_loss.png, one eval_<task>_<metric>.png per downstream metric, and for
    RL runs reward.png and completion_length.png (the mean length per step, shaded from the
    shortest to the longest completion)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_figure(comparison, _train_loss, x=x, title="training loss", y_label="loss",
                       path=out / "loss.png", log_y=True),
               _figure(comparison, _validation_loss, x=x, title="validation loss",
                       y_label="loss", path=out / "validation_loss.png", log_y=True),
               _figure(comparison, _train_metric("reward"), x=x, title="reward (mean over completions)",
                       y_label="reward", path=out / "reward.png"),
               _figure(comparison, _train_metric("completions/mean_length"), x=x,
                       title="completion length (mean; shaded: min to max)", y_label="tokens",
                       path=out / "completion_length.png",
                       band=(_train_metric("completions/min_length"),
                             _train_metric("completions/max_length")))]
    for metric in comparison.metrics:
        chance = comparison.chance(metric)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)
        written.append(_figure(comparison, _downstream(metric), x=x, title=metric,
                               y_label=metric.split("/")[-1], path=out / f"eval_{name}.png",
                               chance=chance))
    return [p for p in written if p is not None]
