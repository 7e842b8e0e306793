"""The notebook and terminal reprs of RLMResult and ExecResult (_repr_html_, __rich__)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from rlm.display.formatting import as_int, as_text, clean_text, field_of, fmt_time, plural
from rlm.display.markup import STYLE, esc, pre_html
from rlm.display.metrics import metrics_from_result
from rlm.display.page import fragment_html
from rlm.display.terminal import (
    TERM_MAX_CHARS,
    TERM_MAX_LINES,
    answer_panel,
    metrics_table,
    output_text,
)


def result_html(result: Any) -> str:
    """An ``RLMResult`` as HTML for a notebook (its ``_repr_html_``).

    Answer first, then the metrics (the result's own numbers: iterations, root and sub
    usage, sub-calls, wall time, stopped reason), then the iterations from its
    trajectory, collapsible, with highlighted code. Any object with those attributes
    works; missing ones are shown as dashes.
    """
    events = [e for e in (field_of(result, "trajectory", []) or []) if isinstance(e, Mapping)]
    return fragment_html(events, metrics=metrics_from_result(result), title="RLM result")


def result_rich(result: Any) -> RenderableType:
    """An ``RLMResult`` as a rich renderable for a terminal (its ``__rich__``): the
    answer in a panel with the key numbers, then the metrics table."""
    m = metrics_from_result(result)
    return Group(answer_panel(m), metrics_table(m))


def _exec_fields(r: Any) -> dict[str, Any]:
    return {
        "stdout": as_text(field_of(r, "stdout", "")),
        "stderr": as_text(field_of(r, "stderr", "")),
        "error": field_of(r, "error"),
        "final": field_of(r, "final"),
        "duration_s": field_of(r, "duration_s"),
        "sub_calls": as_int(field_of(r, "sub_calls")) or 0,
        "truncated": bool(field_of(r, "truncated", False)),
    }


def _exec_summary(f: dict[str, Any]) -> str:
    bits = ["ExecResult", fmt_time(f["duration_s"])]
    if f["sub_calls"]:
        bits.append(plural(f['sub_calls'], 'sub-call'))
    if f["truncated"]:
        bits.append("output truncated")
    bits.append("error" if f["error"] else "ok")
    return " · ".join(bits)


def exec_result_html(r: Any) -> str:
    """An ``ExecResult`` as HTML for a notebook (its ``_repr_html_``): a header with the
    duration, sub-calls and status, then stdout, stderr (amber), the error (red) and the
    final answer (green) when set, all escaped."""
    f = _exec_fields(r)
    parts = [f'<div style="{STYLE["cell_head"]}">{esc(_exec_summary(f))}</div>']
    if f["stdout"]:
        parts.append(pre_html(f["stdout"].rstrip("\n"), "pre"))
    if f["stderr"]:
        parts.append(pre_html(f["stderr"].rstrip("\n"), "stderr"))
    if f["error"]:
        parts.append(pre_html(as_text(f["error"]), "error"))
    if f["final"] is not None:
        parts.append(pre_html("FINAL → " + as_text(f["final"]), "final"))
    if not (f["stdout"] or f["stderr"] or f["error"] or f["final"] is not None):
        parts.append(f'<div style="{STYLE["cell_head"]}">(no output)</div>')
    return f'<div style="{STYLE["root"]}">{"".join(parts)}</div>'


def exec_result_rich(r: Any) -> RenderableType:
    """An ``ExecResult`` as a rich renderable for a terminal (its ``__rich__``): the
    outputs in a panel titled with duration, sub-calls and status."""
    f = _exec_fields(r)
    parts: list[RenderableType] = []
    if f["stdout"]:
        parts.append(output_text(f["stdout"], "", TERM_MAX_LINES, TERM_MAX_CHARS))
    if f["stderr"]:
        parts.append(output_text(f["stderr"], "yellow", TERM_MAX_LINES, TERM_MAX_CHARS))
    if f["error"]:
        parts.append(output_text(as_text(f["error"]), "bold red", TERM_MAX_LINES, TERM_MAX_CHARS))
    if f["final"] is not None:
        parts.append(Text.assemble(("FINAL → ", "bold green"), clean_text(f["final"])))
    if not parts:
        parts.append(Text("(no output)", style="dim"))
    return Panel(Group(*parts), title=Text(_exec_summary(f), style="dim"), title_align="left",
                 border_style="red" if f["error"] else "cyan", padding=(0, 1))

