"""PNG charts with matplotlib (headless): line charts (loss curves, compared runs) and heat maps
(passkey retrieval), written atomically with readable axes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

LOG_SPAN = 3.0
"""A y axis whose positive values span more than this factor is drawn on a log scale."""


def figure(size: tuple[float, float] = (8.0, 4.8)):
    """A new (figure, axes) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=110)


def readable_axes(ax, *, log_y: bool = False, engineering_x: bool = False) -> None:
    """Log scale on y where the data span enough for it to help (with plain tick labels), and
    1k / 1M / 1G labels on an x axis of token counts."""
    from matplotlib.ticker import EngFormatter, FormatStrFormatter

    values = [float(v) for line in ax.get_lines() for v in line.get_ydata()]
    positive = [v for v in values if v > 0]
    if log_y and positive and len(positive) == len(values) and max(positive) / min(positive) > LOG_SPAN:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    if engineering_x:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, alpha=0.3)


def save_figure(fig, path: str | Path) -> Path:
    """Render ``fig`` to ``path`` (PNG) under a temporary name, then rename it into place."""
    import matplotlib.pyplot as plt

    from megasmol.utils.fs import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def line_chart(path: str | Path, series: dict[str, Sequence[tuple[float, float]]], *, title: str,
               x_label: str, y_label: str, log_y: bool = True) -> Path:
    """``series`` ({name: [(x, y), ...]}) as lines with a legend."""
    if not any(series.values()):
        raise ValueError("line_chart: no data points")
    fig, ax = figure()
    for name, values in series.items():
        points = sorted(values)
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], label=name, linewidth=1.6,
                    marker="o" if len(points) < 30 else None, markersize=3)
    readable_axes(ax, log_y=log_y)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def heatmap(path: str | Path, grid: Sequence[Sequence[float]], *, rows: Sequence[str],
            columns: Sequence[str], title: str, row_label: str, column_label: str) -> Path:
    """A [rows x columns] grid of values in [0, 1], red (0) to green (1), each cell labelled."""
    fig, ax = figure((1.6 + 1.1 * len(columns), 1.4 + 0.7 * len(rows)))
    image = ax.imshow([[float(v) for v in row] for row in grid], cmap="RdYlGn", vmin=0.0, vmax=1.0,
                      aspect="auto")
    ax.set_xticks(range(len(columns)), labels=[str(c) for c in columns])
    ax.set_yticks(range(len(rows)), labels=[str(r) for r in rows])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * float(value):.0f}%", ha="center", va="center", fontsize=9,
                    color="black")
    ax.set_title(title)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    return save_figure(fig, path)
