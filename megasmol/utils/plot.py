"""Small PNG line charts with Pillow (loss curves), so a picture needs no plotting stack."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_chart(path: str | Path, series: dict[str, Sequence[tuple[float, float]]], *, title: str,
               x_label: str, y_label: str, size: tuple[int, int] = (900, 540)) -> Path:
    """Write ``series`` ({name: [(x, y), ...]}) as a PNG line chart with axes and a legend."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 80, 30, 50, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("line_chart: no data points")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in _ticks(y0, y1):
        _, py = to_pixel(x0, y)
        draw.line([left - 5, py, left, py], fill="black")
        draw.line([left, py, width - right, py], fill=(230, 230, 230))
        draw.text((8, py - 6), f"{y:.2f}", fill="black")
    for x in _ticks(x0, x1):
        px, _ = to_pixel(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px - 12, height - bottom + 10), f"{x:.0f}", fill="black")
    draw.text((width // 2 - 4 * len(title), 15), title, fill="black")
    draw.text((width // 2 - 4 * len(x_label), height - 25), x_label, fill="black")
    draw.text((8, top - 25), y_label, fill="black")
    for index, (name, values) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        pixels = [to_pixel(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels if len(pixels) < 30 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        ly = top + 10 + 18 * index
        draw.line([width - right - 170, ly + 6, width - right - 140, ly + 6], fill=color, width=3)
        draw.text((width - right - 132, ly), name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def heatmap(path: str | Path, grid: Sequence[Sequence[float]], *, rows: Sequence[str],
            columns: Sequence[str], title: str, row_label: str, column_label: str,
            cell: int = 90) -> Path:
    """Write a [rows x columns] grid of values in [0, 1] as a red (0) to green (1) PNG."""
    from PIL import Image, ImageDraw

    left, top = 110, 60
    width, height = left + cell * len(columns) + 20, top + cell * len(rows) + 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), title, fill="black")
    draw.text((left, 35), column_label, fill="black")
    draw.text((8, top - 20), row_label, fill="black")
    for j, name in enumerate(columns):
        draw.text((left + j * cell + cell // 3, height - 40), str(name), fill="black")
    for i, name in enumerate(rows):
        draw.text((8, top + i * cell + cell // 2 - 6), str(name), fill="black")
        for j, value in enumerate(grid[i]):
            value = min(1.0, max(0.0, float(value)))
            color = (int(220 * (1 - value)) + 20, int(180 * value) + 30, 40)
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=color)
            draw.text((x + cell // 3, y + cell // 2 - 6), f"{100 * value:.0f}%", fill="white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
