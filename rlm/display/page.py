"""A trajectory as HTML: one self-contained page (rlm view --html) or a fragment for a
notebook. Every piece of model or code output is escaped."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rlm.display.formatting import (
    Event,
    as_int,
    as_text,
    field_of,
    fmt_cost,
    fmt_int,
    fmt_time,
    preview,
    prose_of,
    schema_issues_text,
    sub_calls_text,
    token_notes,
)
from rlm.display.markup import MONO, STYLE, code_html, details_html, esc, pre_html, table_html
from rlm.display.metrics import Metrics, metrics_from_events
from rlm.display.timeline import render_timeline, timeline_from_events
from rlm.display.tree import Cell, Iteration, Run, build_runs

# Iterations shown open at the top of a run's page; the rest start folded.
OPEN_ITERATIONS = 2


def _note_html(e: Event) -> str:
    kind = e.get("type")
    if kind == "final":
        source = as_text(e.get("source"))
        if source == "last_turn":
            return (f'<div style="{STYLE["note_warn"]}">⚠ no FINAL before the iteration limit: '
                    "the answer is the root's last-turn reply</div>")
        return (f'<div style="color:#116329;margin:4px 0">✓ final answer'
                f'{" (" + esc(source) + ")" if source else ""}</div>')
    if kind == "answer_invalid":
        return (f'<div style="{STYLE["note_warn"]}">✗ answer refused by the schema: '
                f'{esc(schema_issues_text(e))}</div>')
    if kind == "budget":
        return f'<div style="{STYLE["note_warn"]}">⚠ budget: {esc(e.get("reason"))}</div>'
    if kind == "error":
        return f'<div style="{STYLE["note_err"]}">✗ error: {esc(e.get("message"))}</div>'
    return ""


def _cell_html(cell: Cell) -> str:
    r = cell.result
    info = [f"cell {cell.number}"]
    if r is not None:
        info.append(fmt_time(r.get("duration_s")))
        if as_int(r.get("sub_calls")):
            info.append(sub_calls_text(as_int(r.get("sub_calls")), as_int(r.get("cached_sub_calls"))))
        if r.get("truncated"):
            info.append("output truncated")
        if r.get("error"):
            info.append("error")
    else:
        info.append("no result (the run stopped here)")
    parts = [f'<div style="{STYLE["cell_head"]}">{esc(" · ".join(info))}</div>']
    if cell.code is not None:
        parts.append(code_html(cell.code))
    # Child runs and sub-queries happened while the cell ran, before its output was complete.
    for child in cell.children:
        parts.append(_run_html(child))
    if cell.sub_queries:
        parts.append(_sub_queries_html(cell.sub_queries))
    if r is not None:
        outputs = []
        lines = 0
        for name, style in (("stdout", "pre"), ("stderr", "stderr"), ("error", "error")):
            value = as_text(r.get(name))
            if value.strip():
                lines += value.count("\n") + 1
                outputs.append(pre_html(value.rstrip("\n"), style))
        if r.get("final") is not None:
            outputs.append(pre_html("FINAL → " + as_text(r.get("final")), "final"))
        if outputs:
            summary = f"output ({lines:,} line{'s' if lines != 1 else ''})" if lines else "output"
            # Errors open by default: they are why the next iteration looks the way it does.
            parts.append(details_html(esc(summary), "".join(outputs), open_=bool(r.get("error"))))
        else:
            parts.append(f'<div style="{STYLE["cell_head"]}">(no output)</div>')
    return "".join(parts)


def _sub_queries_html(calls: list[Any]) -> str:
    """A cell's recorded sub-queries, folded: one line each (prompt → reply), opening to
    both texts. The page's filter box finds them by the ``rlm-subq`` class."""
    items = []
    for i, call in enumerate(calls, 1):
        prompt, reply = as_text(field_of(call, "prompt", "")), as_text(field_of(call, "reply", ""))
        mark = " (cached)" if field_of(call, "cached") else ""
        summary = f"#{i}{mark} {preview(prompt, 90)} → {preview(reply, 60)}"
        body = (f'<div style="{STYLE["cell_head"]}">prompt</div>{pre_html(prompt, "pre")}'
                f'<div style="{STYLE["cell_head"]}">reply</div>{pre_html(reply, "pre")}')
        items.append(details_html(esc(summary), body, css_class="rlm-subq"))
    n = len(calls)
    return details_html(esc(f"sub-queries ({n:,} recorded)" if n != 1 else "sub-query (1 recorded)"),
                        "".join(items))


def _iteration_html(it: Iteration, *, open_: bool = False) -> str:
    usage = it.reply.get("usage") if it.reply is not None else None
    bits = [f"Iteration {it.number}", f"{len(it.cells)} cell{'s' if len(it.cells) != 1 else ''}"]
    if usage is not None:
        tokens = (as_int(field_of(usage, "prompt_tokens")) or 0) + (as_int(field_of(usage, "completion_tokens")) or 0)
        bits.append(f"{tokens:,} root tokens")
        bits.append(fmt_cost(field_of(usage, "cost_usd")))
    if it.start_t is not None and it.end_t is not None:
        bits.append(fmt_time(it.end_t - it.start_t))
    elif it.reply is not None and it.reply.get("elapsed_s") is not None:
        bits.append(fmt_time(it.reply.get("elapsed_s")))
    results = [c.result for c in it.cells if c.result is not None]
    subs = sum(as_int(r.get("sub_calls")) or 0 for r in results)
    if subs:
        bits.append(sub_calls_text(subs, sum(as_int(r.get("cached_sub_calls")) or 0 for r in results)))
    if any(c.result is not None and c.result.get("error") for c in it.cells):
        bits.append("error")
    parts = []
    if it.messages:
        shown = []
        for msg in it.messages:
            role = as_text(field_of(msg, "role", "?"))
            shown.append(f'<div style="{STYLE["cell_head"]}">{esc(role)}</div>'
                         + pre_html(as_text(field_of(msg, "content", msg if isinstance(msg, str) else "")), "pre"))
        n = len(it.messages)
        parts.append(details_html(esc(f"prompt sent ({n} new message{'s' if n != 1 else ''})"), "".join(shown)))
    if it.reply is not None:
        first = it.cells[0].number if it.cells else 1
        prose = prose_of(as_text(it.reply.get("content")), markdown=False, first_cell=first)
        if prose:
            parts.append(f'<div style="{STYLE["label"]}">root</div><div style="{STYLE["prose"]}">{esc(prose)}</div>')
        elapsed = it.reply.get("elapsed_s")
        if usage is not None or elapsed is not None:
            parts.append(
                f'<div style="{STYLE["cell_head"]}">root turn: {esc(fmt_int(field_of(usage, "prompt_tokens")))} prompt'
                f' + {esc(fmt_int(field_of(usage, "completion_tokens")))} completion tokens'
                f'{esc(" · " + notes) if (notes := token_notes(usage)) else ""}'
                f' · {esc(fmt_cost(field_of(usage, "cost_usd")))} · {esc(fmt_time(elapsed))}'
                f'{" · from the cache" if it.reply.get("cached") else ""}</div>'
            )
    parts.extend(_cell_html(c) for c in it.cells)
    parts.extend(_note_html(n) for n in it.notes)
    return details_html(esc(" · ".join(bits)), "".join(parts), style="iteration", summary_style="summary",
                        open_=open_)


def _answer_html(m: Metrics) -> str:
    if m.answer is None:
        body = esc(f"No answer ({m.stopped_reason or 'unknown'})")
        if m.error:
            body += pre_html(m.error, "error")
        return f'<div style="{STYLE["noanswer"]}"><div style="{STYLE["label"]}">Answer</div>{body}</div>'
    if m.stopped_reason == "max_iterations":
        return (f'<div style="{STYLE["limit"]}"><div style="{STYLE["label"]}">Answer · iteration limit '
                f"reached, no FINAL (the root's last-turn reply)</div>"
                f'<pre style="{STYLE["answer_pre"]}">{esc(m.answer)}</pre></div>')
    return (f'<div style="{STYLE["answer"]}"><div style="{STYLE["label"]}">Answer</div>'
            f'<pre style="{STYLE["answer_pre"]}">{esc(m.answer)}</pre></div>')


def _run_html(run: Run, metrics: Metrics | None = None, title: str | None = None,
              extra: str = "") -> str:
    m = metrics if metrics is not None else metrics_from_events(run.events, run.key)
    start = run.start or {}
    if run.depth:
        # What the parent sent (older logs: the generic child instruction in the query).
        asked = as_text(start.get("prompt")) or m.query or ""
        head = f"sub-RLM (depth {run.depth}) · {preview(asked, 100)}"
        tail = "no answer" if m.answer is None else preview(m.answer, 100)
        body = (_answer_html(m) + table_html(m.rows())
                + "".join(_iteration_html(it) for it in run.iterations)
                + "".join(_note_html(n) for n in run.notes))
        return details_html(esc(f"{head} → {tail}"), body, style="child", summary_style="subsummary")
    parts = []
    if title:
        parts.append(f'<div style="{STYLE["title"]}">{esc(title)}</div>')
    if m.query:
        parts.append(f'<div style="{STYLE["query"]}"><span style="{STYLE["label"]}">Query</span> {esc(m.query)}</div>')
    parts.append(_answer_html(m))
    # The answer box shows the run's error; the table and the notes would repeat it.
    parts.append(table_html([row for row in m.rows() if m.answer is not None or row[0] != "Error"]))
    parts.append(extra)
    context = start.get("context")
    if context:
        parts.append(details_html("context", pre_html(as_text(context), "pre")))
    # The first iterations open, so the first screen shows code, and so does the last,
    # where the answer was given (or the run stopped); the ones between stay folded.
    last = len(run.iterations) - 1
    parts.extend(_iteration_html(it, open_=i < OPEN_ITERATIONS or i == last)
                 for i, it in enumerate(run.iterations))
    parts.extend(_note_html(n) for n in run.notes if not _repeats_error(n, m))
    return f'<div style="{STYLE["root"]}">{"".join(parts)}</div>'


def _repeats_error(note: Event, m: Metrics) -> bool:
    message = as_text(note.get("message") or note.get("reason"))
    return m.answer is None and bool(m.error) and note.get("type") in ("error", "budget") and (
        message == m.error or message in (m.error or "")
    )


def fragment_html(events: list[Event], metrics: Metrics | None = None, title: str | None = None,
                  extra: str = "") -> str:
    runs = build_runs(events)
    if not runs:
        m = metrics if metrics is not None else Metrics()
        body = (f'<div style="{STYLE["title"]}">{esc(title)}</div>' if title else "")
        return f'<div style="{STYLE["root"]}">{body}{_answer_html(m)}{table_html(m.rows())}</div>'
    # The given metrics (a result's own numbers) describe the first top-level run.
    # ``extra`` (the page's timeline) goes under the first run's metrics.
    return "".join(
        _run_html(run, metrics if i == 0 else None, title if i == 0 else None, extra if i == 0 else "")
        for i, run in enumerate(runs)
    )


def trajectory_fragment_html(events: Iterable[Event]) -> str:
    """A trajectory as an HTML fragment (no ``<html>``/``<head>``) for a notebook.

    The answer comes first, then a metrics table, then each iteration collapsed in a
    ``<details>`` with the root's text, the code highlighted by pygments with inline
    styles and the outputs collapsed. Every piece of model or code output is escaped,
    styles are inline and nothing is loaded from elsewhere, so it renders the same in
    Jupyter and in a notebook viewer that strips scripts and style sheets.
    """
    return fragment_html([e for e in events if isinstance(e, Mapping)])


def trajectory_html(events: Iterable[Event], title: str | None = None) -> str:
    """A trajectory as one self-contained HTML page (``rlm view LOG --html OUT``).

    The page is the fragment of ``trajectory_fragment_html`` in a minimal document
    titled with the run's query (or ``title``), with no external assets. When the run
    recorded sub-queries, a filter box (the page's one small inline script) shows only
    the sub-queries whose prompt or reply contains the text typed, opening them.
    """
    events = [e for e in events if isinstance(e, Mapping)]
    m = metrics_from_events(events) if events else Metrics()
    page_title = title
    if title is None:
        # The browser tab names the run by its query; the page shows the query just below.
        title = "RLM trajectory"
        page_title = f"{preview(m.query, 100)} · RLM trajectory" if m.query else title
    has_sub_queries = any(e.get("type") == "sub_queries" and e.get("calls") for e in events)
    extra = _timeline_html(events)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(page_title)}</title>\n</head>\n"
        '<body style="margin:0;padding:16px;background:#f6f8fa">\n'
        + (_FILTER_BOX if has_sub_queries else "")
        + f"{fragment_html(events, title=title, extra=extra)}\n</body>\n</html>\n"
    )


def _timeline_html(events: list[Event]) -> str:
    """The page's timeline (root turns, cells, sub-queries in flight) and how to export
    the run's spans, folded open; empty when nothing was timed."""
    line = timeline_from_events(events)
    svg = render_timeline(line)
    if not svg:
        return ""
    bits = ["timeline", fmt_time(line.end), f"{len(line.turns)} root turn{'s' if len(line.turns) != 1 else ''}",
            f"{len(line.cells)} cell{'s' if len(line.cells) != 1 else ''}"]
    if line.sub_queries:
        bits.append(f"{line.sub_queries:,} sub-quer{'y' if line.sub_queries == 1 else 'ies'}, "
                    f"at most {line.peak:,} in flight")
    # A note, not a link: the page loads and links nothing (it may be shared as one file).
    export = ("Export these spans for Langfuse, Phoenix or any OpenTelemetry backend: "
              "rlm view LOG --otlp OUT.json writes them as OTLP JSON (with prompts and replies "
              "when OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true); POST that file "
              "to the backend's /v1/traces.")
    body = (f'<div id="rlm-timeline">{svg}</div>'
            f'<div style="{STYLE["cell_head"]}">{esc(export)}</div>')
    return details_html(esc(" · ".join(bits)), body, open_=True)


# The filter works on the page's own elements only; nothing is fetched or evaluated.
_FILTER_BOX = f"""<div style="max-width:1000px;margin:0 0 8px 0;font-family:{MONO};font-size:13px">
<label>filter sub-queries: <input id="rlm-filter" type="search" placeholder="text in a prompt or reply"
 style="width:24em;padding:3px 6px"></label> <span id="rlm-filter-count" style="color:#57606a"></span>
</div>
<script>
(function () {{
  var box = document.getElementById("rlm-filter");
  var count = document.getElementById("rlm-filter-count");
  box.addEventListener("input", function () {{
    var q = box.value.toLowerCase();
    var items = document.querySelectorAll("details.rlm-subq");
    var shown = 0;
    items.forEach(function (d) {{
      var hit = !q || d.textContent.toLowerCase().indexOf(q) >= 0;
      d.style.display = hit ? "" : "none";
      d.open = Boolean(q) && hit;
      if (hit) shown++;
      if (q && hit) {{
        for (var p = d.parentElement; p; p = p.parentElement) {{
          if (p.tagName === "DETAILS") p.open = true;
        }}
      }}
    }});
    count.textContent = q ? shown + " of " + items.length + " match" : "";
  }});
}})();
</script>
"""



