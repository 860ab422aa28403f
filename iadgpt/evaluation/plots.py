"""Line charts (ROC and PRO curves) drawn with Pillow alone.

matplotlib is not a dependency of iadgpt (and is absent on the CPU machines the project runs on),
while a benchmark report still needs its curves; a chart of a few polylines with axes, ticks and a
legend is all the report draws, so Pillow, already a dependency, does it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["line_chart"]

SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                  (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""The tab10 palette, cycled: distinct for up to ten series (MVTec has 15 categories; colours then
repeat, the legend order still tells them apart)."""

WIDTH, HEIGHT = 720, 560
LEFT, RIGHT, TOP, BOTTOM = 64, 200, 40, 56
"""Canvas and margins in pixels; the right margin holds the legend."""


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def line_chart(path: str | os.PathLike, series: Sequence[tuple[str, np.ndarray, np.ndarray]], *, title: str,
               x_label: str, y_label: str, x_max: float = 1.0, y_max: float = 1.0,
               diagonal: bool = False) -> Path:
    """Draw `series` (label, x, y) as polylines on [0, x_max] x [0, y_max] and save a PNG at `path`.

    Points beyond `x_max` are cut at the border (a PRO curve is plotted up to its FPR limit), and
    `diagonal` adds the dashed chance line of a ROC plot.
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    small, large = _font(12), _font(15)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_pixel(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        px = LEFT + np.clip(x / x_max, 0.0, 1.0) * plot_w
        py = TOP + (1.0 - np.clip(y / y_max, 0.0, 1.0)) * plot_h
        return list(zip(px.tolist(), py.tolist()))

    for step in range(6):  # grid and tick labels at 0, 0.2, ..., 1 of each axis
        fraction = step / 5
        x = LEFT + fraction * plot_w
        y = TOP + (1 - fraction) * plot_h
        draw.line([(x, TOP), (x, TOP + plot_h)], fill=(230, 230, 230))
        draw.line([(LEFT, y), (LEFT + plot_w, y)], fill=(230, 230, 230))
        draw.text((x, TOP + plot_h + 6), f"{fraction * x_max:.2g}", fill="black", font=small, anchor="ma")
        draw.text((LEFT - 6, y), f"{fraction * y_max:.2g}", fill="black", font=small, anchor="rm")
    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline="black")
    if diagonal:
        for start in np.arange(0.0, 1.0, 0.04):
            draw.line(to_pixel(np.array([start, start + 0.02]) * x_max, np.array([start, start + 0.02]) * y_max),
                      fill=(160, 160, 160))
    for index, (label, xs, ys) in enumerate(series):
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        inside = xs <= x_max
        if not inside.all():  # close the curve at the border, interpolated
            cut = int(np.argmax(~inside))
            if cut > 0:
                y_at_border = np.interp(x_max, xs[cut - 1:cut + 1], ys[cut - 1:cut + 1])
                xs, ys = np.append(xs[:cut], x_max), np.append(ys[:cut], y_at_border)
            else:
                xs, ys = xs[:0], ys[:0]
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        if xs.size >= 2:
            draw.line(to_pixel(xs, ys), fill=colour, width=2)
        legend_y = TOP + 4 + index * 18
        draw.line([(WIDTH - RIGHT + 16, legend_y + 7), (WIDTH - RIGHT + 40, legend_y + 7)], fill=colour, width=3)
        draw.text((WIDTH - RIGHT + 46, legend_y), label[:22], fill="black", font=small)
    draw.text((LEFT + plot_w / 2, 12), title, fill="black", font=large, anchor="ma")
    draw.text((LEFT + plot_w / 2, HEIGHT - 22), x_label, fill="black", font=small, anchor="ma")
    y_text = Image.new("RGB", (plot_h, 18), "white")
    ImageDraw.Draw(y_text).text((plot_h / 2, 2), y_label, fill="black", font=small, anchor="ma")
    image.paste(y_text.rotate(90, expand=True), (6, TOP))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
