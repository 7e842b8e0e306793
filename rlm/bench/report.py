"""What ``rlm bench`` shows: summary.json, report.html with its plots, and the terminal table.

This module turns result records (one per task, length, method and seed) into means
per (task, length, method) and renders them three ways. It must not run models or
grade answers (``rlm.bench.runner`` and ``rlm.bench.scorers`` do). The plots follow
the RLM paper's figure 1: input length on a log-2 axis, one line per method, one
panel per task family; they need matplotlib (``pip install 'rlm-sandbox[bench]'``),
and without it the page keeps its table and says how to get the plots.
"""

from __future__ import annotations

import html
import io
import json
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plots_svg", "rich_table", "summarize", "write_html", "write_summary"]

# One colour per method, kept across every plot and the table.
_COLOURS = {"rlm": "#1f6feb", "direct": "#d1242f", "rlms": "#8250df"}
# Lines that lie on top of each other (equal scores) must stay visible.
_STYLES = {"rlm": ("o", "-", 7, True), "direct": ("s", "--", 11, False),
           "rlms": ("^", ":", 13, False)}


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, length, method): cells, mean score and cost, and more.

    Rows are sorted by task, then length in tokens, then method. ``score`` and
    ``cost_usd`` are means over the cells; ``wall_s`` is the median; ``over_window``
    and ``errors`` count cells (an over-window cell scores 0 and is not an error).
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((str(r["task"]), str(r["length"]), str(r["method"])), []).append(r)
    rows = []
    for (task, length, method), cells in groups.items():
        rows.append({
            "task": task,
            "length": length,
            "tokens": int(cells[0].get("length_tokens") or 0),
            "method": method,
            "n": len(cells),
            "score": statistics.fmean(float(c.get("score") or 0.0) for c in cells),
            "cost_usd": statistics.fmean(float(c.get("cost_usd") or 0.0) for c in cells),
            "tokens_used": statistics.fmean(int(c.get("tokens") or 0) for c in cells),
            "wall_s": statistics.median(float(c.get("wall_s") or 0.0) for c in cells),
            "over_window": sum(1 for c in cells if c.get("over_window")),
            "errors": sum(1 for c in cells if c.get("error") and not c.get("over_window")),
        })
    order = {m: i for i, m in enumerate(_COLOURS)}
    rows.sort(key=lambda r: (r["task"], r["tokens"], r["length"], order.get(r["method"], 99),
                             r["method"]))
    return rows


def write_summary(directory: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]],
                  meta: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (``meta`` plus the rows) atomically; return its path."""
    path = Path(directory) / "summary.json"
    data = {**meta, "rows": list(rows)}
    _atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cell_text(row: Mapping[str, Any]) -> tuple[str, str]:
    score = f"{row['score']:.3f}"
    if row["over_window"] == row["n"]:
        score = "over window"
    elif row["over_window"]:
        score += f" ({row['over_window']} over window)"
    return score, f"${row['cost_usd']:.4f}"


def rich_table(rows: Sequence[Mapping[str, Any]], title: str = "rlm bench") -> Any:
    """The summary as a rich Table: task, length, method, cells, score, cost, tokens, time."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in ("task", "length", "method", "cells", "score", "cost/cell", "tokens/cell",
                 "wall s (median)", "errors"):
        table.add_column(name, justify="left" if name in ("task", "length", "method") else "right")
    previous = None
    for row in rows:
        if previous is not None and row["task"] != previous:
            table.add_section()
        previous = row["task"]
        score, cost = _cell_text(row)
        table.add_row(row["task"], row["length"], row["method"], str(row["n"]), score, cost,
                      f"{row['tokens_used']:,.0f}", f"{row['wall_s']:.2f}", str(row["errors"]))
    return table


def plots_svg(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Score-vs-length and cost-vs-length panels (one per task) as SVG text.

    None when matplotlib is not installed. Lengths are on a log-2 axis labelled as
    given (8k, 32k...); each method is one line with markers, as in the paper's figure 1.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return None
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.6 * len(tasks) + 0.6, 6.4),
                             squeeze=False, constrained_layout=True)
    for col, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task]
        ticks = sorted({(r["tokens"], r["length"]) for r in mine})
        for row_i, (key, label) in enumerate((("score", "score (%)"), ("cost_usd", "cost per task (USD)"))):
            ax = axes[row_i][col]
            for method in dict.fromkeys(r["method"] for r in mine):
                pts = sorted((r["tokens"], r[key] * (100 if key == "score" else 1))
                             for r in mine if r["method"] == method)
                marker, line, size, filled = _STYLES.get(method, ("D", "-.", 9, False))
                colour = _COLOURS.get(method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line,
                        linewidth=2, markersize=size, label=method, color=colour,
                        markerfacecolor=colour if filled else "none", markeredgewidth=2)
            ax.set_xscale("log", base=2)
            ax.set_xticks([t for t, _ in ticks], [lab for _, lab in ticks])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            if key == "score":
                ax.set_ylim(-3, 103)
                ax.set_title(task)
            else:
                top = max((r["cost_usd"] for r in mine), default=0.0)
                ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
                ax.set_xlabel("input context length (tokens)")
            if col == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(loc="lower left", frameon=False)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em;
       color: #1f2328; max-width: 1400px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
.meta { color: #59636e; margin-bottom: 1.5em; }
table { border-collapse: collapse; margin: 1em 0 2em; }
th, td { padding: 4px 12px; border-bottom: 1px solid #d1d9e0; text-align: right; }
th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }
th { background: #f6f8fa; }
tr.first td { border-top: 2px solid #9198a1; }
.note { color: #59636e; }
svg { max-width: 100%; height: auto; }
"""


def write_html(directory: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]],
               meta: Mapping[str, Any]) -> Path:
    """Write ``report.html``: one self-contained page with the table and the plots."""
    esc = html.escape
    lines = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>rlm bench report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>rlm bench</h1>",
        f'<p class="meta">{esc(_meta_line(meta))}</p>',
        '<table id="summary"><thead><tr>',
        "".join(f"<th>{h}</th>" for h in ("task", "length", "method", "cells", "score",
                                           "cost / cell", "tokens / cell", "wall s (median)",
                                           "errors")),
        "</tr></thead><tbody>",
    ]
    previous = None
    for row in rows:
        first = ' class="first"' if previous is not None and row["task"] != previous else ""
        previous = row["task"]
        score, cost = _cell_text(row)
        cells = (row["task"], row["length"], row["method"], str(row["n"]), score, cost,
                 f"{row['tokens_used']:,.0f}", f"{row['wall_s']:.2f}", str(row["errors"]))
        lines.append(f"<tr{first}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    svg = plots_svg(rows)
    if svg is None:
        lines.append('<p class="note">Plots need matplotlib: pip install '
                     "'rlm-sandbox[bench]', then run rlm bench score on this directory.</p>")
    else:
        lines.append('<h2>Score and cost against input length</h2><div id="plots">'
                     f"{svg}</div>")
    lines.append('<p class="note">Scores are means over the cells of each row (1.000 is every '
                 "answer right); a direct call past the model's window is recorded as over "
                 "window and scores 0, as in the RLM paper. Costs are USD per task at the "
                 "prices in use.</p></body></html>")
    path = Path(directory) / "report.html"
    _atomic_write(path, "\n".join(lines) + "\n")
    return path


def _meta_line(meta: Mapping[str, Any]) -> str:
    bits = []
    for key in ("model", "recursive_model", "prompt", "cells", "cost_usd", "updated"):
        if meta.get(key) is not None:
            value = meta[key]
            if key == "cost_usd":
                value = f"${value:.4f}"
            bits.append(f"{key.replace('_', ' ')}: {value}")
    return " · ".join(bits)
