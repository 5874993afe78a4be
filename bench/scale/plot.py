"""A dependency-free line plot (PIL, which ecif already needs): panels side by side, log-log axes."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
PANEL_W, PANEL_H, MARGIN = 520, 380, 70


def _ticks(low: float, high: float) -> list[float]:
    """Powers of ten (and 2×, 5× when the range is short) inside ``[low, high]``."""
    ticks = []
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        steps = (1, 2, 5) if math.log10(high / low) < 2 else (1,)
        ticks += [step * 10.0**exponent for step in steps if low <= step * 10.0**exponent <= high]
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if value < 1e4 else f"{value:.0e}".replace("e+0", "e")


def line_panels(path: Path, panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], x_label: str) -> None:
    """``panels``: ``(title, {series: [(x, y), ...]})``; writes a PNG with log-scaled x and y."""
    image = Image.new("RGB", (PANEL_W * len(panels), PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, series) in enumerate(panels):
        left = index * PANEL_W + MARGIN
        right, top, bottom = (index + 1) * PANEL_W - 20, 40, PANEL_H - 50
        xs = [x for points in series.values() for x, _ in points]
        ys = [y for points in series.values() for _, y in points]
        x_low, x_high = min(xs) / 1.3, max(xs) * 1.3
        y_low, y_high = min(ys) / 1.5, max(ys) * 1.5

        def at(x: float, y: float) -> tuple[float, float]:
            fx = (math.log(x) - math.log(x_low)) / (math.log(x_high) - math.log(x_low))
            fy = (math.log(y) - math.log(y_low)) / (math.log(y_high) - math.log(y_low))
            return left + fx * (right - left), bottom - fy * (bottom - top)

        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 12), title, fill="black")
        draw.text(((left + right) / 2 - 20, bottom + 28), x_label, fill="black")
        for tick in _ticks(x_low, x_high):
            x, _ = at(tick, y_low)
            draw.line([x, bottom, x, bottom + 5], fill="black")
            draw.text((x - 12, bottom + 8), _label(tick), fill="black")
        for tick in _ticks(y_low, y_high):
            _, y = at(x_low, tick)
            draw.line([left - 5, y, left, y], fill="black")
            draw.line([left, y, right, y], fill=(225, 225, 225))
            draw.text((left - MARGIN + 5, y - 6), _label(tick), fill="black")
        for number, (name, points) in enumerate(sorted(series.items())):
            colour = COLOURS[number % len(COLOURS)]
            corners = [at(x, y) for x, y in sorted(points)]
            if len(corners) > 1:
                draw.line(corners, fill=colour, width=3)
            for x, y in corners:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((left + 10, top + 10 + 16 * number), f"- {name}", fill=colour)
    image.save(path)
