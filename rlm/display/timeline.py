"""A run's timeline as a small inline SVG: the root turns, the cells, and the sub-queries
in flight over time, drawn from the trajectory's timestamps for the HTML page.

Sub-queries are counted per column (a fixed number of columns, whatever their number),
so a 10,000-sub-query run draws as light as a ten-query one. Tooltips are SVG
``<title>`` elements; every text is escaped and there is no script. This module must
not hold the page around it (``rlm.display.page``) or read logs (``rlm.trajectory``).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlm.display.formatting import Event, as_num, fmt_time
from rlm.display.markup import esc
from rlm.trajectory import read_sub_calls

__all__ = ["COLUMNS", "Timeline", "render_timeline", "timeline_from_events", "timeline_svg"]

# Columns of the sub-query lane: each shows the most sub-queries in flight at once
# during its slice of the run.
COLUMNS = 200
_WIDTH = 960
_LABEL = 130
_PLOT = _WIDTH - _LABEL - 10
_BAR = 14
_AREA = 56


@dataclass
class Timeline:
    """What the SVG shows: spans (start, end, label, failed) of the top-level run's root
    turns and cells, and the peak number of sub-queries in flight per column."""

    end: float = 0.0
    turns: list[tuple[float, float, str, bool]] = field(default_factory=list)
    cells: list[tuple[float, float, str, bool]] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    peak: int = 0
    sub_queries: int = 0


def _intervals(events: Sequence[Event]) -> tuple[list[float], list[float]]:
    """Start and end times of every sub-query, at every depth (each sorted)."""
    starts: list[float] = []
    ends: list[float] = []
    cell_start: dict[str, float] = {}
    for e in events:
        kind = e.get("type")
        key = str(e.get("child_run") or e.get("run_id") or "")
        if kind == "cell":
            cell_start[key] = as_num(e.get("t")) or 0.0
        elif kind == "sub_queries":
            if "t0" not in e and key in cell_start:
                # A log from before sub-queries were timed: they ran during their cell.
                e = {**e, "t0": cell_start[key]}
            calls = read_sub_calls(e)
            for item in calls.items:
                starts.append(item.start)
                ends.append(max(item.start, item.end))
            starts.extend([calls.t0] * len(calls.tail_ends))
            ends.extend(max(calls.t0, end) for end in calls.tail_ends)
    starts.sort()
    ends.sort()
    return starts, ends


def _peaks(starts: list[float], ends: list[float], end: float, columns: int) -> list[int]:
    """The most intervals open at once within each of ``columns`` equal slices of
    [0, end]: the count open at a slice's start, raised by each start inside it."""
    if not starts or end <= 0:
        return [0] * columns
    width = end / columns
    peaks = []
    for c in range(columns):
        lo, hi = c * width, (c + 1) * width
        # Open at lo: started at or before lo, not ended by then.
        level = bisect.bisect_right(starts, lo) - bisect.bisect_right(ends, lo)
        best = level
        # Starts inside the slice can only raise it; ends inside lower it after.
        i = bisect.bisect_right(starts, lo)
        j = bisect.bisect_right(ends, lo)
        while i < len(starts) and starts[i] < hi:
            t = starts[i]
            while j < len(ends) and ends[j] < t:
                level -= 1
                j += 1
            level += 1
            i += 1
            best = max(best, level)
        peaks.append(max(0, best))
    return peaks


def timeline_from_events(events: Sequence[Event]) -> Timeline:
    """The timeline of the first top-level run in ``events`` (its children count in
    the sub-queries in flight)."""
    line = Timeline()
    top = next((str(e.get("run_id")) for e in events
                if e.get("type") == "run_start" and not e.get("child_run")), None)
    if top is None:
        return line
    mine = [e for e in events if str(e.get("run_id")) == top]
    line.end = max((as_num(e.get("t")) or 0.0 for e in mine), default=0.0)
    asked: dict[Any, float] = {}
    opened: dict[Any, float] = {}
    for e in mine:
        if e.get("child_run"):
            continue
        kind, t = e.get("type"), as_num(e.get("t")) or 0.0
        if kind == "root_request":
            asked[e.get("iteration")] = t
        elif kind == "root_reply" and e.get("iteration") in asked:
            start = asked.pop(e.get("iteration"))
            line.turns.append((start, t, f"root turn {e.get('iteration')}", False))
        elif kind == "compaction":
            line.turns.append((as_num(e.get("t0")) or t, t, "compaction", False))
        elif kind == "cell":
            opened[(e.get("iteration"), e.get("index"))] = t
        elif kind == "cell_result" and (e.get("iteration"), e.get("index")) in opened:
            start = opened.pop((e.get("iteration"), e.get("index")))
            label = f"iteration {e.get('iteration')}, cell {(as_num(e.get('index')) or 0) + 1:.0f}"
            line.cells.append((start, t, label, bool(e.get("error"))))
    # Whatever never ended ran until the log stops.
    line.turns.extend((s, line.end, f"root turn {i} (no reply)", True) for i, s in asked.items())
    line.cells.extend((s, line.end, "cell (no result)", True) for s in opened.values())
    starts, ends = _intervals(mine)
    if ends:
        line.end = max(line.end, ends[-1])
    line.sub_queries = len(starts)
    line.in_flight = _peaks(starts, ends, line.end, COLUMNS)
    line.peak = max(line.in_flight, default=0)
    return line


def _x(t: float, end: float) -> float:
    return _LABEL + (t / end * _PLOT if end > 0 else 0.0)


def _bars(spans: Sequence[tuple[float, float, str, bool]], end: float, y: int, color: str) -> str:
    out = []
    for start, stop, label, failed in spans:
        x0, x1 = _x(start, end), _x(max(start, stop), end)
        fill = "#cf222e" if failed else color
        tip = f"{label}: {fmt_time(stop - start)} (at {start:.2f} s)"
        out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(1.0, x1 - x0):.1f}" height="{_BAR}" '
                   f'fill="{fill}" rx="2"><title>{esc(tip)}</title></rect>')
    return "".join(out)


def _ticks(end: float, y: int) -> str:
    if end <= 0:
        return ""
    step = next((s for s in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10,
                             20, 30, 60, 120, 300, 600, 1800, 3600, 7200) if end / s <= 10), 3600.0)
    out = []
    n = 0
    while n * step <= end + 1e-9:
        t = n * step
        x = _x(t, end)
        out.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#8c959f"/>'
                   f'<text x="{x:.1f}" y="{y + 15}" font-size="10" text-anchor="middle" '
                   f'fill="#57606a">{esc(fmt_time(t) if t else "0")}</text>')
        n += 1
    return "".join(out)


def timeline_svg(events: Sequence[Mapping[str, Any]]) -> str:
    """The timeline of the first top-level run in ``events`` as an inline ``<svg>``
    (see ``render_timeline``)."""
    return render_timeline(timeline_from_events([e for e in events if isinstance(e, Mapping)]))


def render_timeline(line: Timeline) -> str:
    """``line`` as an inline ``<svg>`` (an empty string when nothing in it was timed): a
    lane of root turns, a lane of cells, and a filled profile of the sub-queries in
    flight, peak per column, with tooltips."""
    if line.end <= 0 or not (line.turns or line.cells or line.sub_queries):
        return ""
    end = line.end
    y_turns, y_cells, y_area = 8, 30, 56
    axis = y_area + _AREA + 6
    height = axis + 22
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_WIDTH} {height}" width="100%" '
        f'style="max-width:{_WIDTH}px;display:block;font-family:sans-serif" role="img" '
        f'aria-label="timeline of the run">',
        f'<text x="4" y="{y_turns + 11}" font-size="11" fill="#1f2328">root turns</text>',
        f'<text x="4" y="{y_cells + 11}" font-size="11" fill="#1f2328">cells</text>',
        f'<text x="4" y="{y_area + 20}" font-size="11" fill="#1f2328">sub-queries</text>',
        f'<text x="4" y="{y_area + 34}" font-size="10" fill="#57606a">in flight (peak {line.peak:,})</text>',
        f'<line x1="{_LABEL}" y1="{axis}" x2="{_LABEL + _PLOT}" y2="{axis}" stroke="#8c959f"/>',
        _bars(line.turns, end, y_turns, "#8250df"),
        _bars(line.cells, end, y_cells, "#0969da"),
    ]
    if line.peak:
        width = _PLOT / len(line.in_flight)
        base = y_area + _AREA
        points = [f"M{_LABEL:.1f},{base}"]
        for c, value in enumerate(line.in_flight):
            top = base - value / line.peak * _AREA
            x0 = _LABEL + c * width
            points.append(f"L{x0:.1f},{top:.1f}L{x0 + width:.1f},{top:.1f}")
        points.append(f"L{_LABEL + _PLOT:.1f},{base}Z")
        parts.append(f'<path d="{"".join(points)}" fill="#1a7f37" fill-opacity="0.55" stroke="none"/>')
        for c, value in enumerate(line.in_flight):
            if value:
                t0, t1 = c * end / len(line.in_flight), (c + 1) * end / len(line.in_flight)
                tip = f"{t0:.2f}-{t1:.2f} s: up to {value:,} sub-quer{'y' if value == 1 else 'ies'} in flight"
                parts.append(f'<rect x="{_LABEL + c * width:.1f}" y="{y_area}" width="{width:.2f}" '
                             f'height="{_AREA}" fill="transparent"><title>{esc(tip)}</title></rect>')
    parts.append(_ticks(end, axis))
    parts.append("</svg>")
    return "".join(parts)
