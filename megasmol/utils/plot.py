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
