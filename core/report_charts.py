"""Geometry of the report's SVG charts: line charts with optional shaded bands, and stacked bar charts.

These functions turn data into pixel coordinates; the Jinja macros in
``reports/templates/_charts.html`` draw them as inline SVG, so the report needs
no JavaScript library.  All coordinates are in SVG user units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


#: Colours of the runs' lines and bars, in run order (cycled after 8 runs).
RUN_COLOURS = ("#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5c940d", "#495057")
#: Colours of the broad categories of the built-in concept sets; other categories take FALLBACK_COLOURS.
CATEGORY_COLOURS = {
    "breast anatomy or structure": "#4c6ef5",
    "breast locations": "#15aabf",
    "findings and characterisations": "#e8590c",
    "interpretations": "#ae3ec9",
    "action or follow-up": "#2f9e44",
    "non-mammography": "#adb5bd",
}
FALLBACK_COLOURS = ("#f59f00", "#0ca678", "#e64980", "#7048e8", "#74b816", "#1098ad")
UNKNOWN_COLOUR = "#dee2e6"
UNKNOWN_LABEL = "no category"

MARGIN_LEFT = 56
MARGIN_RIGHT = 16
MARGIN_TOP = 16
MARGIN_BOTTOM = 64
#: Half the width, in SVG user units, of a band drawn at a single x position.
BAND_HALF_WIDTH = 6.0


def run_colour(index: int) -> str:
    """Return the colour of the run at position ``index``."""
    return RUN_COLOURS[index % len(RUN_COLOURS)]


def category_colours(categories: Sequence[str | None]) -> dict[str | None, str]:
    """Assign a colour to every broad category; None (no category) is light grey."""
    colours: dict[str | None, str] = {}
    extra = 0
    for category in categories:
        if category in colours:
            continue
        if category is None:
            colours[None] = UNKNOWN_COLOUR
        elif category in CATEGORY_COLOURS:
            colours[category] = CATEGORY_COLOURS[category]
        else:
            colours[category] = FALLBACK_COLOURS[extra % len(FALLBACK_COLOURS)]
            extra += 1
    return colours


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Return about ``count`` round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw_step = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(factor * magnitude for factor in (1, 2, 2.5, 5, 10) if factor * magnitude >= raw_step)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value < high + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


def format_tick(value: float) -> str:
    """Format a tick value with as few decimals as it needs (at most 3)."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def line_chart(
    x_labels: Sequence[str],
    series: Sequence[dict[str, Any]],
    *,
    y_range: tuple[float, float] | None = None,
    width: int = 640,
    height: int = 300,
    value_format: str = "{:.3f}",
    bands: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Lay out a line chart with one point per x label and one line per series.

    :param series: dicts with ``name``, ``colour`` and ``values`` (one float
        or None per x label); a None breaks the line.
    :param y_range: fixed y axis limits; default: the data range, rounded to ticks.
    :param bands: shaded ranges drawn behind the lines: dicts with ``name``,
        ``colour``, ``low`` and ``high`` (one float or None per x label).  An x
        label where either bound is None breaks the band.
    :returns: a dict for the ``line_chart`` macro: ``width``, ``height``, the
        plot box, ``x_ticks``, ``y_ticks``, ``lines`` with ``segments``
        (SVG ``points`` strings) and ``points`` (x, y and a tooltip), and
        ``bands`` with ``polygons`` (SVG ``points`` strings).
    """
    values = [value for line in series for value in line["values"] if value is not None and math.isfinite(value)]
    for band in bands:
        values.extend(value for value in (*band["low"], *band["high"]) if value is not None and math.isfinite(value))
    if y_range is not None:
        ticks = nice_ticks(*y_range)
        low, high = y_range
    else:
        ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
        low, high = ticks[0], ticks[-1]
    if high <= low:
        high = low + 1.0
    plot_left, plot_right = MARGIN_LEFT, width - MARGIN_RIGHT
    plot_top, plot_bottom = MARGIN_TOP, height - MARGIN_BOTTOM
    step = (plot_right - plot_left) / max(len(x_labels), 1)

    def x_of(index: int) -> float:
        return round(plot_left + step * (index + 0.5), 1)

    def y_of(value: float) -> float:
        share = (value - low) / (high - low)
        return round(plot_bottom - share * (plot_bottom - plot_top), 1)

    lines = []
    for line in series:
        segments: list[str] = []
        points = []
        current: list[str] = []
        for index, value in enumerate(line["values"]):
            if value is None or not math.isfinite(value):
                if current:
                    segments.append(" ".join(current))
                current = []
                continue
            x, y = x_of(index), y_of(value)
            current.append(f"{x},{y}")
            points.append({"x": x, "y": y, "title": f"{line['name']}, {x_labels[index]}: {value_format.format(value)}"})
        if current:
            segments.append(" ".join(current))
        lines.append({"name": line["name"], "colour": line["colour"], "segments": segments, "points": points})

    laid_out_bands = []
    for band in bands:
        polygons = []
        for run in _finite_runs(band["low"], band["high"]):
            xs = [x_of(index) for index, _, _ in run]
            ys = [(y_of(low), y_of(high)) for _, low, high in run]
            polygons.append(_band_polygon(xs, ys))
        laid_out_bands.append({"name": band["name"], "colour": band["colour"], "polygons": polygons})
    return {
        "width": width,
        "height": height,
        "plot": {"left": plot_left, "right": plot_right, "top": plot_top, "bottom": plot_bottom},
        "x_ticks": [{"x": x_of(index), "label": label} for index, label in enumerate(x_labels)],
        "y_ticks": [{"y": y_of(tick), "label": format_tick(tick)} for tick in ticks if low <= tick <= high],
        "lines": lines,
        "bands": laid_out_bands,
    }


def _finite_runs(
    lows: Sequence[float | None], highs: Sequence[float | None]
) -> list[list[tuple[int, float, float]]]:
    """Split the x positions where both bounds are finite into runs of consecutive positions."""
    runs: list[list[tuple[int, float, float]]] = []
    current: list[tuple[int, float, float]] = []
    for index, (low, high) in enumerate(zip(lows, highs)):
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            if current:
                runs.append(current)
            current = []
            continue
        current.append((index, low, high))
    if current:
        runs.append(current)
    return runs


def _band_polygon(xs: Sequence[float], ys: Sequence[tuple[float, float]]) -> str:
    """Return the SVG ``points`` of a band: along the upper bound, then back along the lower one.

    A band at a single x position becomes a narrow rectangle, so that it stays visible.
    """
    if len(xs) == 1:
        xs = [xs[0] - BAND_HALF_WIDTH, xs[0] + BAND_HALF_WIDTH]
        ys = [ys[0], ys[0]]
    upper = [f"{round(x, 1)},{high}" for x, (_, high) in zip(xs, ys)]
    lower = [f"{round(x, 1)},{low}" for x, (low, _) in zip(reversed(xs), reversed(ys))]
    return " ".join(upper + lower)


def stacked_bar_chart(
    groups: Sequence[str],
    bar_names: Sequence[str],
    counts: dict[tuple[str, str], list[tuple[str | None, int]]],
    colours: dict[str | None, str],
    *,
    width: int = 640,
    height: int = 300,
) -> dict[str, Any]:
    """Lay out grouped bars stacked to 100 %: one group per layer, one bar per run.

    :param counts: (group, bar name) -> list of (category, count); a missing
        or all-zero entry gives an empty bar outline labelled 0.
    :returns: a dict for the ``stacked_bars`` macro with ``bars`` (each with
        ``rects`` and a total) and ``group_ticks``.
    """
    plot_left, plot_right = MARGIN_LEFT, width - MARGIN_RIGHT
    plot_top, plot_bottom = MARGIN_TOP, height - MARGIN_BOTTOM
    plot_height = plot_bottom - plot_top
    group_width = (plot_right - plot_left) / max(len(groups), 1)
    n_bars = max(len(bar_names), 1)
    bar_width = max(2.0, group_width * 0.8 / n_bars)
    bars = []
    group_ticks = []
    for group_index, group in enumerate(groups):
        group_left = plot_left + group_width * group_index + group_width * 0.1
        group_ticks.append({"x": round(plot_left + group_width * (group_index + 0.5), 1), "label": group})
        for bar_index, bar_name in enumerate(bar_names):
            segments = counts.get((group, bar_name), [])
            total = sum(count for _, count in segments)
            x = round(group_left + bar_width * bar_index, 1)
            rects = []
            y = float(plot_bottom)
            for category, count in segments:
                if total == 0 or count == 0:
                    continue
                bar_height = plot_height * count / total
                y -= bar_height
                rects.append(
                    {
                        "x": x,
                        "y": round(y, 1),
                        "width": round(bar_width - 1, 1),
                        "height": round(bar_height, 1),
                        "colour": colours.get(category, UNKNOWN_COLOUR),
                        "title": f"{group}, {bar_name}: {category or UNKNOWN_LABEL} {count} of {total} units",
                    }
                )
            bars.append(
                {
                    "x": x,
                    "width": round(bar_width - 1, 1),
                    "rects": rects,
                    "total": total,
                    "name": bar_name,
                    "number": bar_index + 1,
                    "label_x": round(x + (bar_width - 1) / 2, 1),
                }
            )
    y_ticks = [
        {"y": round(plot_bottom - plot_height * share, 1), "label": f"{int(share * 100)} %"}
        for share in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    return {
        "width": width,
        "height": height,
        "plot": {"left": plot_left, "right": plot_right, "top": plot_top, "bottom": plot_bottom},
        "bars": bars,
        "group_ticks": group_ticks,
        "y_ticks": y_ticks,
        "legend": [{"label": category or UNKNOWN_LABEL, "colour": colour} for category, colour in colours.items()],
    }
