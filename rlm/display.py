"""Rendering a run for people: rich in a terminal, self-contained HTML in a notebook.

Nothing here takes part in a run. Everything reads events (see ``rlm.trajectory``) or
duck-typed result objects, and tolerates missing fields, so an old log, a killed run's
log or a half-built result still renders.

- ``LiveDisplay``: a trajectory sink that shows a run as it happens (``verbose=True``).
- ``render_log``: a whole trajectory in the terminal, with a metrics table (``rlm view``).
- ``trajectory_html`` / ``trajectory_fragment_html``: one page or a notebook fragment.
- ``result_html`` / ``result_rich`` / ``exec_result_html`` / ``exec_result_rich``: the
  notebook and terminal faces of ``RLMResult`` and ``ExecResult``.
- ``BatchProgress``: the progress of many tasks at once (``acompletion_batch``).
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markdown import Markdown
from rich.padding import Padding
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

__all__ = [
    "BatchProgress",
    "LiveDisplay",
    "exec_result_html",
    "exec_result_rich",
    "render_log",
    "result_html",
    "result_rich",
    "trajectory_fragment_html",
    "trajectory_html",
]

Event = Mapping[str, Any]

# Terminal outputs are cut to a head and a tail: a 20,000-character cell output would
# push everything else off the screen, and its end (the totals, the error) matters most
# after its beginning.
_TERM_MAX_LINES = 24
_TERM_MAX_CHARS = 3_000
# HTML keeps much more (it is collapsed by default) but still bounds a notebook's size.
_HTML_MAX_CHARS = 50_000
# A notebook output is a message to the browser; more than two a second is noise.
_NOTEBOOK_REFRESH_S = 0.5


# -- small tolerant readers and formatters -------------------------------------------


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A field of a dict or an attribute of an object, whichever ``obj`` is."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        value = obj.get(name, default)
    else:
        value = getattr(obj, name, default)
    return default if value is None else value


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    n = _num(value)
    return None if n is None else int(n)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _fmt_int(value: Any) -> str:
    n = _int(value)
    return "—" if n is None else f"{n:,}"


def _fmt_cost(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "—"
    # Sub-cent costs are the common case for cheap sub-models; two decimals would read $0.00.
    return f"${n:,.2f}" if n >= 1 else f"${n:.4f}"


def _fmt_time(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "—"
    if n < 0.1:
        return f"{n * 1000:.0f} ms"  # fast cells would all read "0.00 s"
    if n < 60:
        return f"{n:.2f} s"
    minutes, seconds = divmod(int(round(n)), 60)
    return f"{minutes} m {seconds:02d} s"


def _preview(value: Any, limit: int = 120) -> str:
    text = " ".join(_text(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _head_tail(text: str, max_lines: int, max_chars: int) -> tuple[str, str | None, str]:
    """Split a long text into (head, what was omitted, tail); short text is all head."""
    lines = text.splitlines(keepends=True)
    if len(lines) > max_lines:
        keep_head = max(1, max_lines * 2 // 3)
        keep_tail = max(1, max_lines - keep_head)
        head, tail = "".join(lines[:keep_head]), "".join(lines[-keep_tail:])
        omitted = f"… {len(lines) - keep_head - keep_tail:,} lines omitted …\n"
        if len(head) + len(tail) <= max_chars:
            return head, omitted, tail
    if len(text) > max_chars:
        keep_head = max_chars * 2 // 3
        keep_tail = max_chars - keep_head
        omitted = f"\n… {len(text) - max_chars:,} characters omitted …\n"
        return text[:keep_head], omitted, text[-keep_tail:]
    return text, None, ""


# Root replies carry their code in fences; the cells show that code highlighted right
# after, so the reply's prose keeps only a marker instead of the code twice.
_CODE_FENCE = re.compile(
    r"^[ \t]*```[ \t]*(?:repl|python|py|python3)?[ \t]*\n.*?^[ \t]*```[ \t]*$",
    re.DOTALL | re.MULTILINE,
)


def _prose(content: str, markdown: bool = True) -> str:
    """The root's text with its code fences replaced by markers; empty when the text was
    nothing but code."""
    if not _CODE_FENCE.search(content):
        return content.strip()
    count = 0

    def marker(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        # Its own paragraph, so Markdown does not run it into the sentence before.
        return f"\n\n*(code → cell {count})*\n\n" if markdown else f"\n\n(code → cell {count})\n\n"

    if not _CODE_FENCE.sub("", content).strip():
        return ""
    return re.sub(r"\n{3,}", "\n\n", _CODE_FENCE.sub(marker, content)).strip()


def _run_key(event: Event) -> str:
    # A child run's events are forwarded into the parent's trajectory with the parent's
    # run_id and the child's own id in ``child_run``.
    return _text(event.get("child_run") or event.get("run_id"))


def _depth(event: Event) -> int:
    return max(0, _int(event.get("depth")) or 0)


def _cell_number(event: Event) -> int:
    # The engine numbers cells from 0; people count from 1.
    index = _int(event.get("index"))
    return 1 if index is None else index + 1


def _usage_total_tokens(usage: Any) -> int | None:
    total = _int(_get(usage, "total_tokens"))
    if total:
        return total
    prompt, completion = _int(_get(usage, "prompt_tokens")), _int(_get(usage, "completion_tokens"))
    if prompt is None and completion is None:
        return total
    return (prompt or 0) + (completion or 0)


# -- metrics: one summary of a run, used by every face ---------------------------------


@dataclass
class _Metrics:
    answer: str | None = None
    query: str | None = None
    model: str | None = None
    recursive_model: str | None = None
    iterations: int | None = None
    root_calls: int | None = None
    root_prompt_tokens: int | None = None
    root_completion_tokens: int | None = None
    root_tokens: int | None = None
    root_cost: float | None = None
    sub_calls: int | None = None
    sub_tokens: int | None = None
    sub_cost: float | None = None
    elapsed_s: float | None = None
    stopped_reason: str | None = None
    error: str | None = None
    log_path: str | None = None

    @property
    def total_tokens(self) -> int | None:
        if self.root_tokens is None and self.sub_tokens is None:
            return None
        return (self.root_tokens or 0) + (self.sub_tokens or 0)

    @property
    def total_cost(self) -> float | None:
        if self.root_cost is None and self.sub_cost is None:
            return None
        return (self.root_cost or 0.0) + (self.sub_cost or 0.0)

    def rows(self) -> list[tuple[str, str]]:
        """The metrics table, as label/value pairs shared by the terminal and HTML."""
        root_tokens = _fmt_int(self.root_tokens)
        if self.root_prompt_tokens is not None or self.root_completion_tokens is not None:
            root_tokens += (
                f" ({_fmt_int(self.root_prompt_tokens)} prompt"
                f" + {_fmt_int(self.root_completion_tokens)} completion)"
            )
        rows = [
            ("Iterations", _fmt_int(self.iterations)),
            ("Root calls", _fmt_int(self.root_calls)),
            ("Root tokens", root_tokens),
            ("Root cost", _fmt_cost(self.root_cost)),
            ("Sub-calls", _fmt_int(self.sub_calls)),
            ("Sub tokens", _fmt_int(self.sub_tokens)),
            ("Sub cost", _fmt_cost(self.sub_cost)),
            ("Total tokens", _fmt_int(self.total_tokens)),
            ("Total cost", _fmt_cost(self.total_cost)),
            ("Wall time", _fmt_time(self.elapsed_s)),
            ("Stopped", self.stopped_reason or "—"),
        ]
        if self.model:
            models = self.model
            if self.recursive_model and self.recursive_model != self.model:
                models += f" (sub: {self.recursive_model})"
            rows.append(("Models", models))
        if self.error:
            rows.append(("Error", _preview(self.error, 300)))
        if self.log_path:
            rows.append(("Log", self.log_path))
        return rows

    def summary(self) -> str:
        """One line with the key numbers, for a panel's subtitle."""
        parts = []
        if self.iterations is not None:
            parts.append(f"{self.iterations:,} iteration{'s' if self.iterations != 1 else ''}")
        if self.sub_calls is not None:
            parts.append(f"{self.sub_calls:,} sub-calls")
        if self.total_tokens is not None:
            parts.append(f"{self.total_tokens:,} tokens")
        if self.total_cost is not None:
            parts.append(_fmt_cost(self.total_cost))
        if self.elapsed_s is not None:
            parts.append(_fmt_time(self.elapsed_s))
        if self.stopped_reason:
            parts.append(self.stopped_reason)
        return " · ".join(parts)


def _apply_usage(m: _Metrics, usage: Any) -> None:
    root, sub = _get(usage, "root"), _get(usage, "sub")
    if root is not None:
        m.root_calls = _int(_get(root, "calls", m.root_calls))
        m.root_prompt_tokens = _int(_get(root, "prompt_tokens", m.root_prompt_tokens))
        m.root_completion_tokens = _int(_get(root, "completion_tokens", m.root_completion_tokens))
        m.root_tokens = _usage_total_tokens(root)
        m.root_cost = _num(_get(root, "cost_usd"))
    if sub is not None:
        if m.sub_calls is None:
            m.sub_calls = _int(_get(sub, "calls"))
        m.sub_tokens = _usage_total_tokens(sub)
        m.sub_cost = _num(_get(sub, "cost_usd"))


def _metrics_from_events(events: list[Event], key: str | None = None) -> _Metrics:
    """Summarise one run (``key``, default the first top-level one) from its events.

    ``run_end`` holds the authoritative numbers; a killed run has none, so the numbers
    are added up from what did happen and the reason says the log is incomplete.
    """
    if key is None:
        tops = [e for e in events if _depth(e) == 0]
        key = _run_key(tops[0]) if tops else (_run_key(events[0]) if events else "")
    own = [e for e in events if _run_key(e) == key]
    m = _Metrics()
    root_prompt = root_completion = root_calls = sub_calls = 0
    root_cost = 0.0
    for e in own:
        kind = e.get("type")
        if kind == "run_start":
            m.query = _text(e.get("query")) or None
            m.model = _text(e.get("model")) or None
            m.recursive_model = _text(e.get("recursive_model")) or None
        elif kind == "root_reply":
            root_calls += 1
            usage = e.get("usage")
            root_prompt += _int(_get(usage, "prompt_tokens")) or 0
            root_completion += _int(_get(usage, "completion_tokens")) or 0
            root_cost += _num(_get(usage, "cost_usd")) or 0.0
        elif kind == "cell_result":
            sub_calls += _int(e.get("sub_calls")) or 0
        elif kind == "final":
            m.answer = _text(e.get("answer"))
        elif kind in ("budget", "error") and not m.error:
            m.error = _text(e.get("reason") or e.get("message")) or None
    iterations = [n for e in own if (n := _int(e.get("iteration"))) is not None]
    m.iterations = max(iterations) if iterations else 0
    m.root_calls, m.sub_calls = root_calls, sub_calls
    m.root_prompt_tokens, m.root_completion_tokens = root_prompt, root_completion
    m.root_tokens, m.root_cost = root_prompt + root_completion, root_cost
    m.elapsed_s = _num(own[-1].get("t")) if own else None
    m.stopped_reason = "incomplete (no run_end)" if own else None
    ends = [e for e in own if e.get("type") == "run_end"]
    if ends:
        end = ends[-1]
        if end.get("answer") is not None:
            m.answer = _text(end.get("answer"))
        m.iterations = _int(end.get("iterations")) if end.get("iterations") is not None else m.iterations
        m.sub_calls = _int(end.get("sub_calls")) if end.get("sub_calls") is not None else m.sub_calls
        m.elapsed_s = _num(end.get("elapsed_s")) if end.get("elapsed_s") is not None else m.elapsed_s
        m.stopped_reason = _text(end.get("stopped_reason")) or None
        m.error = _text(end.get("error")) or m.error
        _apply_usage(m, end.get("usage"))
    return m


def _metrics_from_result(result: Any) -> _Metrics:
    events = list(_get(result, "trajectory", []) or [])
    m = _metrics_from_events(events) if events else _Metrics()
    # The result's own fields win over what the events say: they are the final word.
    answer = _get(result, "answer")
    if answer is not None:
        m.answer = _text(answer)
    for name in ("iterations", "sub_calls"):
        value = _int(_get(result, name))
        if value is not None:
            setattr(m, name, value)
    elapsed = _num(_get(result, "elapsed_s"))
    if elapsed is not None:
        m.elapsed_s = elapsed
    if _get(result, "stopped_reason"):
        m.stopped_reason = _text(_get(result, "stopped_reason"))
    if _get(result, "error"):
        m.error = _text(_get(result, "error"))
    if _get(result, "log_path"):
        m.log_path = _text(_get(result, "log_path"))
    usage = _get(result, "usage")
    if usage is not None:
        _apply_usage(m, usage)
    return m


# -- the terminal view -----------------------------------------------------------------


def _output_text(text: str, style: str, max_lines: int, max_chars: int, indent: str = "") -> Text:
    head, omitted, tail = _head_tail(text.rstrip("\n"), max_lines, max_chars)
    out = Text()
    # Indent by prefixing lines rather than with Padding: Padding pads every line with
    # trailing spaces up to the widest one, which litters logs and copied text.
    for piece, piece_style in ((head, style), (omitted, "dim italic"), (tail, style)):
        if not piece:
            continue
        if out and not out.plain.endswith("\n"):
            out.append("\n")
        for line in piece.rstrip("\n").split("\n"):
            out.append(indent)
            out.append(line + "\n", style=piece_style)
    out.rstrip()
    return out


def _metrics_table(m: _Metrics, title: str = "Metrics") -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", overflow="fold")
    for label, value in m.rows():
        table.add_row(label, value)
    return table


def _answer_panel(m: _Metrics) -> Panel:
    failed = m.answer is None
    if failed:
        body = Text(f"no answer ({m.stopped_reason or 'unknown'})", style="bold red")
        if m.error:
            body.append("\n" + m.error, style="red")
    else:
        body = Text(m.answer or "")
    return Panel(
        body,
        title="[bold]Answer[/]",
        subtitle=Text(m.summary(), style="dim"),
        border_style="red" if failed else "green",
        padding=(0, 1),
    )


class _TerminalProgress:
    """Sub-query progress lines for a console: a rich bar in a terminal, one updating
    output in a notebook, and a start and an end line in a plain file (a CI log)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._notebook: dict[str, _NotebookLine] = {}
        self._started: dict[str, float] = {}

    def update(self, key: str, label: str, done: int, total: int) -> None:
        finished = total > 0 and done >= total
        first = key not in self._started
        if first:
            self._started[key] = time.monotonic()
        if self.console.is_jupyter:
            line = self._notebook.get(key)
            if line is None:
                line = self._notebook[key] = _NotebookLine()
            elapsed = time.monotonic() - self._started[key]
            line.show(_progress_html(label, done, total, 0, elapsed, None),
                      _progress_text(label, done, total, 0, elapsed, None), force=finished)
        elif self.console.is_interactive:
            if self._bar is None:
                self._bar = _new_bar(self.console, transient=True)
                self._bar.start()
            if key not in self._tasks:
                self._tasks[key] = self._bar.add_task(label, total=total or None, failed="")
            self._bar.update(self._tasks[key], completed=done, total=total or None)
        elif first or finished:
            # A file gets no redraws: a line per update would fill a CI log.
            self.console.print(Text(_progress_text(label, done, total, 0, None, None), style="dim"))
        if finished:
            self.finish(key)

    def finish(self, key: str | None = None) -> None:
        """Drop one batch's line (or all of them): the batch is over."""
        keys = list(self._started) if key is None else [key]
        for k in keys:
            self._started.pop(k, None)
            line = self._notebook.pop(k, None)
            if line is not None:
                line.flush()
            task = self._tasks.pop(k, None)
            if task is not None and self._bar is not None:
                self._bar.remove_task(task)
        if self._bar is not None and not self._tasks:
            self._bar.stop()
            self._bar = None


def _new_bar(console: Console, *, transient: bool) -> Progress:
    # redirect_stdout/stderr off: swapping the process-wide sys.stdout would fight the
    # REPL's own per-session output capture.
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]}", style="red"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        redirect_stdout=False,
        redirect_stderr=False,
    )


class LiveDisplay:
    """A trajectory sink that shows a run live in the terminal (``RLM(verbose=True)``).

    Call it with each event: it prints every iteration as it happens (the root's text,
    each cell's code highlighted, its output with errors in red, the root turn's tokens,
    cost and time), shows a progress line while a batch of sub-queries runs, and ends
    with the answer in a panel with the run's key numbers. Child runs are indented by
    their depth. It is thread-safe (events come from the engine loop and cell threads),
    ignores unknown event types, tolerates missing fields, and in a notebook keeps each
    batch's progress in one updating output.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        max_output_lines: int = _TERM_MAX_LINES,
        max_output_chars: int = _TERM_MAX_CHARS,
    ) -> None:
        self.console = console if console is not None else Console()
        self.max_output_lines = max_output_lines
        self.max_output_chars = max_output_chars
        self._lock = threading.RLock()
        self._progress = _TerminalProgress(self.console)
        self._iteration_shown: dict[str, int] = {}
        self._events: dict[str, list[Event]] = {}

    def __call__(self, event: Event) -> None:
        """Show one event."""
        if not isinstance(event, Mapping):
            return
        with self._lock:
            kind = event.get("type")
            if kind == "subcalls":
                self._subcalls(event)
                return
            key = _run_key(event)
            self._events.setdefault(key, []).append(event)
            if kind in ("cell_result", "run_end", "error", "budget"):
                # A batch that ended early (an error in the cell) never reports total/total.
                self._finish_batches(key)
            parts = self._render(event)
            if kind == "run_end":
                self._events.pop(key, None)
                self._iteration_shown.pop(key, None)
            if not parts:
                return
            depth = _depth(event)
            body: RenderableType = parts[0] if len(parts) == 1 else Group(*parts)
            if depth:
                body = Padding(body, (0, 0, 0, 4 * depth), expand=False)
            # One print per event: rich renders it whole under its own lock, so lines
            # from events on different threads never interleave.
            self.console.print(body)

    def close(self) -> None:
        """Take down any progress line still showing (a run interrupted mid-batch)."""
        with self._lock:
            self._progress.finish()

    def _finish_batches(self, key: str) -> None:
        for batch in [k for k in self._progress._started if k.startswith(key + "\x00")]:
            self._progress.finish(batch)

    def _subcalls(self, event: Event) -> None:
        done, total = _int(event.get("done")) or 0, _int(event.get("total")) or 0
        depth = _depth(event)
        label = "sub-queries" if not depth else f"{'  ' * depth}[d{depth}] sub-queries"
        # One line per run; a batch id, when the engine sends one, separates concurrent batches.
        key = _run_key(event) + "\x00" + _text(event.get("batch"))
        self._progress.update(key, label, done, total)

    # One method per event type keeps the look of each in one place.
    def _render(self, event: Event) -> list[RenderableType]:
        kind = _text(event.get("type"))
        method = getattr(self, f"_render_{kind}", None)
        if method is None:
            return []
        parts: list[RenderableType] = []
        iteration = _int(event.get("iteration"))
        key = _run_key(event)
        if iteration is not None and self._iteration_shown.get(key) != iteration:
            self._iteration_shown[key] = iteration
            parts.append(self._iteration_rule(event, iteration))
        parts.extend(method(event))
        return parts

    @staticmethod
    def _tag(event: Event) -> str:
        depth = _depth(event)
        return f"[d{depth}] " if depth else ""

    def _iteration_rule(self, event: Event, iteration: int) -> RenderableType:
        label = f"{self._tag(event)}iteration {iteration}"
        return Rule(Text(label, style="bold"), align="left", style="blue" if not _depth(event) else "dim blue")

    def _render_run_start(self, event: Event) -> list[RenderableType]:
        query = _text(event.get("query"))
        if _depth(event):
            return [Text.assemble((f"{self._tag(event)}↳ sub-RLM: ", "bold magenta"), _preview(query, 200))]
        model = _text(event.get("model")) or "?"
        sub = _text(event.get("recursive_model"))
        title = f"RLM · {model}" + (f" (sub: {sub})" if sub and sub != model else "")
        parts: list[RenderableType] = [Rule(Text(title, style="bold"), style="magenta")]
        parts.append(Text.assemble(("Query: ", "bold"), query))
        context = event.get("context")
        if context:
            head, omitted, _ = _head_tail(_text(context), 8, 800)
            parts.append(Text.assemble(("Context: ", "bold"), (head.rstrip() + (" …" if omitted else ""), "dim")))
        return parts

    def _render_root_request(self, event: Event) -> list[RenderableType]:
        return []  # The iteration rule printed for it says the turn has started.

    def _render_root_reply(self, event: Event) -> list[RenderableType]:
        prose = _prose(_text(event.get("content")))
        usage = event.get("usage")
        prompt, completion = _int(_get(usage, "prompt_tokens")), _int(_get(usage, "completion_tokens"))
        stats = (
            f"root: {_fmt_int(prompt)} → {_fmt_int(completion)} tokens"
            f" · {_fmt_cost(_get(usage, 'cost_usd'))} · {_fmt_time(event.get('elapsed_s'))}"
        )
        if not prose:
            return [Text(stats, style="dim")]
        return [
            Panel(
                Markdown(prose),
                title=Text(f"{self._tag(event)}root", style="bold blue"),
                title_align="left",
                subtitle=Text(stats, style="dim"),
                subtitle_align="right",
                border_style="dim blue",
                padding=(0, 1),
            )
        ]

    def _render_cell(self, event: Event) -> list[RenderableType]:
        code = _text(event.get("code")).rstrip("\n")
        return [
            Panel(
                Syntax(code, "python", theme="ansi_dark", word_wrap=True, background_color="default"),
                title=Text(f"{self._tag(event)}cell {_cell_number(event)}", style="bold cyan"),
                title_align="left",
                border_style="cyan",
                padding=(0, 1),
            )
        ]

    def _render_cell_result(self, event: Event) -> list[RenderableType]:
        parts: list[RenderableType] = []
        for name, style in (("stdout", ""), ("stderr", "yellow"), ("error", "bold red")):
            value = _text(event.get(name))
            if value.strip():
                parts.append(_output_text(value, style, self.max_output_lines,
                                          self.max_output_chars, indent="  "))
        final = event.get("final")
        if final is not None:
            parts.append(Text.assemble(("  FINAL → ", "bold green"), _preview(final, 300)))
        info = [f"cell {_cell_number(event)}", _fmt_time(event.get("duration_s"))]
        sub_calls = _int(event.get("sub_calls"))
        if sub_calls:
            info.append(f"{sub_calls:,} sub-calls")
        if event.get("truncated"):
            info.append("output truncated")
        if event.get("error"):
            info.append("error")
        parts.append(Text("  ⎿ " + " · ".join(info), style="dim"))
        return parts

    def _render_final(self, event: Event) -> list[RenderableType]:
        source = _text(event.get("source"))
        return [Text.assemble((f"{self._tag(event)}✓ final answer", "bold green"),
                              (f" ({source})" if source else "", "dim"))]

    def _render_budget(self, event: Event) -> list[RenderableType]:
        return [Text.assemble((f"{self._tag(event)}⚠ budget: ", "bold yellow"), _text(event.get("reason")))]

    def _render_error(self, event: Event) -> list[RenderableType]:
        return [Text.assemble((f"{self._tag(event)}✗ error: ", "bold red"), _text(event.get("message")))]

    def _render_run_end(self, event: Event) -> list[RenderableType]:
        m = _metrics_from_events(self._events.get(_run_key(event), [event]), _run_key(event))
        if _depth(event):
            answer = "no answer" if m.answer is None else _preview(m.answer, 200)
            return [Text.assemble((f"{self._tag(event)}↳ sub-RLM answer: ", "bold magenta"), answer,
                                  (f"  ({m.summary()})", "dim"))]
        return [_answer_panel(m)]


def render_log(events: Iterable[Event], console: Console | None = None) -> None:
    """Render a whole trajectory (e.g. from ``read_log``) to the terminal.

    It looks like the live view of the same run (each iteration with the root's text,
    highlighted code and outputs, then the answer), followed by a metrics table per
    top-level run: iterations, root calls, tokens and cost, sub-calls, tokens and cost,
    wall time and why the run stopped. A log cut short by a killed run renders up to
    where it ends, and its table says it is incomplete.
    """
    console = console if console is not None else Console()
    events = [e for e in events if isinstance(e, Mapping)]
    view = LiveDisplay(console)
    for event in events:
        view(event)
    for key in _top_level_keys(events):
        console.print(_metrics_table(_metrics_from_events(events, key)))


def _top_level_keys(events: list[Event]) -> list[str]:
    keys: list[str] = []
    for e in events:
        key = _run_key(e)
        if _depth(e) == 0 and key not in keys:
            keys.append(key)
    return keys


# -- notebook progress -----------------------------------------------------------------


class _NotebookLine:
    """One notebook output updated in place, at most every half second.

    It uses IPython's display handles, not widgets: rich's Jupyter live display needs
    ipywidgets (without it rich only warns and shows nothing), and a widget's state is
    lost in a saved notebook, while a display handle's last HTML stays readable on a
    code host.
    """

    def __init__(self, interval_s: float = _NOTEBOOK_REFRESH_S) -> None:
        self.interval_s = interval_s
        self._handle: Any = None
        self._last = 0.0
        self._pending: dict[str, str] | None = None
        self._failed = False
        self._timer: threading.Timer | None = None
        # Its own lock: the catch-up timer publishes from its own thread.
        self._lock = threading.Lock()

    def show(self, html_text: str, plain: str, *, force: bool = False) -> None:
        bundle = {"text/plain": plain, "text/html": html_text}
        with self._lock:
            now = time.monotonic()
            wait = self.interval_s - (now - self._last)
            if self._handle is not None and not force and wait > 0:
                self._pending = bundle
                # Without a catch-up, a batch that goes quiet after a burst would show a
                # stale count until its next update.
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._catch_up)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._publish(bundle, force=force)
            self._last = now

    def flush(self) -> None:
        """Show the latest state if a throttled update is still waiting; stop the timer."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending is not None:
                self._publish(self._pending, force=True)

    def _catch_up(self) -> None:
        with self._lock:
            self._timer = None
            if self._pending is not None:
                self._publish(self._pending, force=False)
                self._last = time.monotonic()

    def _publish(self, bundle: dict[str, str], *, force: bool) -> None:
        self._pending = None
        if self._failed:
            return
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.display import display

        if not InteractiveShell.initialized():
            # A console forced into Jupyter mode outside IPython: there is no output to
            # update in place, so print a plain line only when it matters.
            if force:
                print(bundle["text/plain"])
            return
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
            self._failed = self._handle is None
        else:
            self._handle.update(bundle, raw=True)


def _progress_text(label: str, done: int, total: int, failed: int,
                   elapsed: float | None, eta: float | None) -> str:
    parts = [f"{label} {done:,}/{total:,}" if total else f"{label} {done:,}"]
    if failed:
        parts.append(f"{failed:,} failed")
    if elapsed is not None:
        parts.append(_fmt_time(elapsed))
    if eta is not None:
        parts.append(f"ETA {_fmt_time(eta)}")
    return " · ".join(parts)


def _progress_html(label: str, done: int, total: int, failed: int,
                   elapsed: float | None, eta: float | None) -> str:
    bar = (
        f'<progress value="{done}" max="{max(total, 1)}" style="width:16em;vertical-align:middle"></progress> '
        if total else ""
    )
    text = html.escape(_progress_text(label, done, total, failed, elapsed, eta))
    if failed:
        text = text.replace(html.escape(f"{failed:,} failed"),
                            f'<span style="color:#cf222e">{failed:,} failed</span>')
    return f'<div style="font-family:{_MONO};font-size:12.5px">{bar}{text}</div>'


class BatchProgress:
    """Progress of many tasks at once: done, failed, elapsed and ETA.

    ``start(total)``, then ``advance(ok)`` as each task ends (from any thread), then
    ``stop()``; also a context manager. In a terminal it is a rich progress bar; in a
    notebook one output updated in place at most every ``refresh_s`` seconds (no widget
    needed); in a plain file (a CI log) a line at each quarter and at the end.
    """

    def __init__(self, description: str = "tasks", console: Console | None = None,
                 *, refresh_s: float = _NOTEBOOK_REFRESH_S) -> None:
        self.description = description
        self.console = console if console is not None else Console()
        self.refresh_s = refresh_s
        self.total = 0
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._started_at: float | None = None
        self._bar: Progress | None = None
        self._task: Any = None
        self._line: _NotebookLine | None = None
        self._next_quarter = 0
        self._printed = -1

    def start(self, total: int) -> None:
        """Show the bar for ``total`` tasks (none done yet)."""
        with self._lock:
            self.total, self.done, self.failed = max(0, int(total)), 0, 0
            self._started_at = time.monotonic()
            if self.console.is_jupyter:
                self._line = _NotebookLine(self.refresh_s)
            elif self.console.is_interactive:
                self._bar = _new_bar(self.console, transient=False)
                self._task = self._bar.add_task(self.description, total=self.total or None, failed="")
                self._bar.start()
            self._next_quarter, self._printed = 0, -1
            self._render(force=True)

    def advance(self, ok: bool = True) -> None:
        """Count one finished task, failed when ``ok`` is false."""
        with self._lock:
            if self._started_at is None:
                return
            self.done += 1
            if not ok:
                self.failed += 1
            self._render(force=False)

    def stop(self) -> None:
        """Show the final state and release the display."""
        with self._lock:
            if self._started_at is None:
                return
            self._render(force=True, final=True)
            if self._bar is not None:
                self._bar.stop()
                self._bar = None
            self._line = None
            self._started_at = None

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _eta(self, elapsed: float) -> float | None:
        if not self.done or not self.total or self.done >= self.total:
            return None
        return elapsed / self.done * (self.total - self.done)

    def _render(self, *, force: bool, final: bool = False) -> None:
        assert self._started_at is not None
        elapsed = time.monotonic() - self._started_at
        eta = None if final else self._eta(elapsed)
        if self._bar is not None:
            failed = f"{self.failed:,} failed" if self.failed else ""
            self._bar.update(self._task, completed=self.done, failed=failed)
        elif self._line is not None:
            args = (self.description, self.done, self.total, self.failed, elapsed, eta)
            self._line.show(_progress_html(*args), _progress_text(*args), force=force)
            if final:
                self._line.flush()
        else:
            # Quarters, not every update: a file keeps every line forever.
            quarter = self.done * 4 // self.total if self.total else 0
            due = quarter >= self._next_quarter or (final and self._printed != self.done)
            if due and self._printed != self.done:
                self._next_quarter = quarter + 1
                self._printed = self.done
                text = _progress_text(self.description, self.done, self.total, self.failed, elapsed, eta)
                self.console.print(Text(text, style="dim"))


# -- HTML ------------------------------------------------------------------------------

_MONO = "ui-monospace,SFMono-Regular,Menlo,Consolas,'DejaVu Sans Mono',monospace"
# Inline styles only: notebook viewers on code hosts strip <style> blocks and scripts,
# and a fixed light palette stays readable under a dark notebook theme.
_S = {
    "root": "font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:14px;"
    "line-height:1.45;color:#1f2328;background:#ffffff;max-width:1000px;padding:8px 12px;"
    "border:1px solid #d0d7de;border-radius:6px;margin:6px 0",
    "title": "font-size:16px;font-weight:600;margin:2px 0 6px 0",
    "query": "margin:4px 0 8px 0",
    "answer": "border:2px solid #1a7f37;background:#f0fff4;border-radius:6px;padding:6px 10px;margin:6px 0",
    "noanswer": "border:2px solid #cf222e;background:#fff5f5;border-radius:6px;padding:6px 10px;margin:6px 0",
    "label": "font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#57606a",
    "pre": f"white-space:pre-wrap;word-break:break-word;font-family:{_MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#f6f8fa;color:#1f2328;border-radius:4px",
    "answer_pre": f"white-space:pre-wrap;word-break:break-word;font-family:{_MONO};font-size:13px;"
    "margin:4px 0;color:#1f2328",
    "stderr": f"white-space:pre-wrap;word-break:break-word;font-family:{_MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#fff8c5;color:#7d4e00;border-radius:4px",
    "error": f"white-space:pre-wrap;word-break:break-word;font-family:{_MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#ffebe9;color:#cf222e;border-radius:4px",
    "final": f"white-space:pre-wrap;word-break:break-word;font-family:{_MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#dafbe1;color:#116329;border-radius:4px",
    "omitted": "color:#57606a;font-style:italic",
    "table": "border-collapse:collapse;margin:6px 0;font-size:13px",
    "th": "text-align:left;padding:2px 14px 2px 0;color:#57606a;font-weight:600;white-space:nowrap;"
    "vertical-align:top",
    "td": f"padding:2px 0;font-family:{_MONO};font-size:12.5px;word-break:break-word",
    "details": "margin:4px 0;border-left:3px solid #d0d7de;padding-left:8px",
    "iteration": "margin:6px 0;border:1px solid #d0d7de;border-radius:6px;padding:4px 8px",
    "summary": "cursor:pointer;font-weight:600",
    "subsummary": "cursor:pointer;color:#57606a;font-size:13px",
    "prose": "white-space:pre-wrap;word-break:break-word;margin:4px 0 8px 0",
    "cell_head": "font-size:12px;color:#57606a;margin:8px 0 2px 0",
    "note_warn": "color:#9a6700;margin:4px 0",
    "note_err": "color:#cf222e;margin:4px 0",
    "child": "margin:6px 0 6px 12px;border-left:3px solid #8250df;padding-left:8px",
    "code_div": "background:#f6f8fa;border-radius:4px;margin:2px 0",
    "code_pre": f"white-space:pre-wrap;word-break:break-word;font-family:{_MONO};font-size:12.5px;"
    "margin:0;padding:6px 8px;line-height:1.35",
}


def _esc(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _pre(text: str, style: str, limit: int = _HTML_MAX_CHARS) -> str:
    head, omitted, tail = _head_tail(text, 10**9, limit)
    body = _esc(head)
    if omitted:
        body += f'<span style="{_S["omitted"]}">{_esc(omitted)}</span>{_esc(tail)}'
    return f'<pre style="{_S[style]}">{body}</pre>'


def _code_html(code: str) -> str:
    """Python highlighted by pygments with inline styles (no stylesheet to ship)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    formatter = HtmlFormatter(noclasses=True, nobackground=True, style="default",
                              cssstyles=_S["code_div"], prestyles=_S["code_pre"])
    return highlight(code, PythonLexer(), formatter)


def _table_html(rows: list[tuple[str, str]]) -> str:
    cells = "".join(
        f'<tr><th style="{_S["th"]}">{_esc(label)}</th><td style="{_S["td"]}">{_esc(value)}</td></tr>'
        for label, value in rows
    )
    return f'<table style="{_S["table"]}">{cells}</table>'


def _details(summary: str, body: str, *, style: str = "details", summary_style: str = "subsummary",
             open_: bool = False) -> str:
    """A collapsible part; ``summary`` is already HTML (escaped by the caller)."""
    attr = " open" if open_ else ""
    return (f'<details{attr} style="{_S[style]}"><summary style="{_S[summary_style]}">{summary}</summary>'
            f"{body}</details>")


@dataclass
class _Cell:
    number: int
    code: str | None = None
    result: Event | None = None
    children: list[_Run] = field(default_factory=list)


@dataclass
class _Iteration:
    number: int
    start_t: float | None = None
    end_t: float | None = None
    messages: list[Any] = field(default_factory=list)
    reply: Event | None = None
    cells: list[_Cell] = field(default_factory=list)
    notes: list[Event] = field(default_factory=list)


@dataclass
class _Run:
    key: str
    depth: int
    events: list[Event] = field(default_factory=list)
    start: Event | None = None
    iterations: list[_Iteration] = field(default_factory=list)
    notes: list[Event] = field(default_factory=list)

    def iteration(self, number: int, t: float | None) -> _Iteration:
        for it in self.iterations:
            if it.number == number:
                return it
        if self.iterations and t is not None and self.iterations[-1].end_t is None:
            self.iterations[-1].end_t = t
        it = _Iteration(number, start_t=t)
        self.iterations.append(it)
        return it

    def open_cell(self) -> _Cell | None:
        for it in reversed(self.iterations):
            for cell in reversed(it.cells):
                if cell.result is None:
                    return cell
        return None


def _build_runs(events: list[Event]) -> list[_Run]:
    """Group a flat event list into runs, iterations and cells; a child run goes inside
    the cell of its parent that was running when it started."""
    runs: dict[str, _Run] = {}
    tops: list[_Run] = []
    for e in events:
        key, depth = _run_key(e), _depth(e)
        run = runs.get(key)
        if run is None:
            run = runs[key] = _Run(key, depth)
            parent = None
            if depth > 0:
                parents = [r for r in runs.values() if r.depth == depth - 1 and r.open_cell()]
                parent = parents[-1].open_cell() if parents else None
            if parent is not None:
                parent.children.append(run)
            else:
                tops.append(run)
        run.events.append(e)
        kind = e.get("type")
        t = _num(e.get("t"))
        number = _int(e.get("iteration"))
        if kind == "run_start":
            run.start = e
        elif kind == "run_end":
            if run.iterations and run.iterations[-1].end_t is None:
                run.iterations[-1].end_t = t
        elif number is not None:
            it = run.iteration(number, t)
            if kind == "root_request":
                messages = e.get("messages")
                it.messages = list(messages) if isinstance(messages, list) else []
            elif kind == "root_reply":
                it.reply = e
            elif kind in ("cell", "cell_result"):
                n = _cell_number(e)
                cell = next((c for c in it.cells if c.number == n), None)
                if cell is None:
                    cell = _Cell(n)
                    it.cells.append(cell)
                if kind == "cell":
                    cell.code = _text(e.get("code"))
                else:
                    cell.result = e
            else:
                it.notes.append(e)
        elif kind in ("final", "budget", "error"):
            run.notes.append(e)
    return tops


def _note_html(e: Event) -> str:
    kind = e.get("type")
    if kind == "final":
        source = _text(e.get("source"))
        return (f'<div style="color:#116329;margin:4px 0">✓ final answer'
                f'{" (" + _esc(source) + ")" if source else ""}</div>')
    if kind == "budget":
        return f'<div style="{_S["note_warn"]}">⚠ budget: {_esc(e.get("reason"))}</div>'
    if kind == "error":
        return f'<div style="{_S["note_err"]}">✗ error: {_esc(e.get("message"))}</div>'
    return ""


def _cell_html(cell: _Cell) -> str:
    r = cell.result
    info = [f"cell {cell.number}"]
    if r is not None:
        info.append(_fmt_time(r.get("duration_s")))
        if _int(r.get("sub_calls")):
            info.append(f"{_int(r.get('sub_calls')):,} sub-calls")
        if r.get("truncated"):
            info.append("output truncated")
        if r.get("error"):
            info.append("error")
    else:
        info.append("no result (the run stopped here)")
    parts = [f'<div style="{_S["cell_head"]}">{_esc(" · ".join(info))}</div>']
    if cell.code is not None:
        parts.append(_code_html(cell.code))
    # Child runs happened while the cell ran, before its output was complete.
    for child in cell.children:
        parts.append(_run_html(child))
    if r is not None:
        outputs = []
        lines = 0
        for name, style in (("stdout", "pre"), ("stderr", "stderr"), ("error", "error")):
            value = _text(r.get(name))
            if value.strip():
                lines += value.count("\n") + 1
                outputs.append(_pre(value.rstrip("\n"), style))
        if r.get("final") is not None:
            outputs.append(_pre("FINAL → " + _text(r.get("final")), "final"))
        if outputs:
            summary = f"output ({lines:,} line{'s' if lines != 1 else ''})" if lines else "output"
            # Errors open by default: they are why the next iteration looks the way it does.
            parts.append(_details(_esc(summary), "".join(outputs), open_=bool(r.get("error"))))
        else:
            parts.append(f'<div style="{_S["cell_head"]}">(no output)</div>')
    return "".join(parts)


def _iteration_html(it: _Iteration) -> str:
    usage = it.reply.get("usage") if it.reply is not None else None
    bits = [f"Iteration {it.number}", f"{len(it.cells)} cell{'s' if len(it.cells) != 1 else ''}"]
    if usage is not None:
        tokens = (_int(_get(usage, "prompt_tokens")) or 0) + (_int(_get(usage, "completion_tokens")) or 0)
        bits.append(f"{tokens:,} root tokens")
        bits.append(_fmt_cost(_get(usage, "cost_usd")))
    if it.start_t is not None and it.end_t is not None:
        bits.append(_fmt_time(it.end_t - it.start_t))
    elif it.reply is not None and it.reply.get("elapsed_s") is not None:
        bits.append(_fmt_time(it.reply.get("elapsed_s")))
    subs = sum(_int(c.result.get("sub_calls")) or 0 for c in it.cells if c.result is not None)
    if subs:
        bits.append(f"{subs:,} sub-calls")
    if any(c.result is not None and c.result.get("error") for c in it.cells):
        bits.append("error")
    parts = []
    if it.messages:
        shown = []
        for msg in it.messages:
            role = _text(_get(msg, "role", "?"))
            shown.append(f'<div style="{_S["cell_head"]}">{_esc(role)}</div>'
                         + _pre(_text(_get(msg, "content", msg if isinstance(msg, str) else "")), "pre"))
        n = len(it.messages)
        parts.append(_details(_esc(f"prompt sent ({n} new message{'s' if n != 1 else ''})"), "".join(shown)))
    if it.reply is not None:
        prose = _prose(_text(it.reply.get("content")), markdown=False)
        if prose:
            parts.append(f'<div style="{_S["label"]}">root</div><div style="{_S["prose"]}">{_esc(prose)}</div>')
        elapsed = it.reply.get("elapsed_s")
        if usage is not None or elapsed is not None:
            parts.append(
                f'<div style="{_S["cell_head"]}">root turn: {_esc(_fmt_int(_get(usage, "prompt_tokens")))} prompt'
                f' + {_esc(_fmt_int(_get(usage, "completion_tokens")))} completion tokens'
                f' · {_esc(_fmt_cost(_get(usage, "cost_usd")))} · {_esc(_fmt_time(elapsed))}</div>'
            )
    parts.extend(_cell_html(c) for c in it.cells)
    parts.extend(_note_html(n) for n in it.notes)
    return _details(_esc(" · ".join(bits)), "".join(parts), style="iteration", summary_style="summary")


def _answer_html(m: _Metrics) -> str:
    if m.answer is None:
        body = _esc(f"No answer ({m.stopped_reason or 'unknown'})")
        if m.error:
            body += _pre(m.error, "error")
        return f'<div style="{_S["noanswer"]}"><div style="{_S["label"]}">Answer</div>{body}</div>'
    return (f'<div style="{_S["answer"]}"><div style="{_S["label"]}">Answer</div>'
            f'<pre style="{_S["answer_pre"]}">{_esc(m.answer)}</pre></div>')


def _run_html(run: _Run, metrics: _Metrics | None = None, title: str | None = None) -> str:
    m = metrics if metrics is not None else _metrics_from_events(run.events, run.key)
    start = run.start or {}
    if run.depth:
        head = f"sub-RLM (depth {run.depth}) · {_preview(m.query or '', 100)}"
        tail = "no answer" if m.answer is None else _preview(m.answer, 100)
        body = (_answer_html(m) + _table_html(m.rows())
                + "".join(_iteration_html(it) for it in run.iterations)
                + "".join(_note_html(n) for n in run.notes))
        return _details(_esc(f"{head} → {tail}"), body, style="child", summary_style="subsummary")
    parts = []
    if title:
        parts.append(f'<div style="{_S["title"]}">{_esc(title)}</div>')
    if m.query:
        parts.append(f'<div style="{_S["query"]}"><span style="{_S["label"]}">Query</span> {_esc(m.query)}</div>')
    parts.append(_answer_html(m))
    parts.append(_table_html(m.rows()))
    context = start.get("context")
    if context:
        parts.append(_details("context", _pre(_text(context), "pre")))
    parts.extend(_iteration_html(it) for it in run.iterations)
    parts.extend(_note_html(n) for n in run.notes)
    return f'<div style="{_S["root"]}">{"".join(parts)}</div>'


def _fragment(events: list[Event], metrics: _Metrics | None = None, title: str | None = None) -> str:
    runs = _build_runs(events)
    if not runs:
        m = metrics if metrics is not None else _Metrics()
        body = (f'<div style="{_S["title"]}">{_esc(title)}</div>' if title else "")
        return f'<div style="{_S["root"]}">{body}{_answer_html(m)}{_table_html(m.rows())}</div>'
    # The given metrics (a result's own numbers) describe the first top-level run.
    return "".join(
        _run_html(run, metrics if i == 0 else None, title if i == 0 else None) for i, run in enumerate(runs)
    )


def trajectory_fragment_html(events: Iterable[Event]) -> str:
    """A trajectory as an HTML fragment (no ``<html>``/``<head>``) for a notebook.

    The answer comes first, then a metrics table, then each iteration collapsed in a
    ``<details>`` with the root's text, the code highlighted by pygments with inline
    styles and the outputs collapsed. Every piece of model or code output is escaped,
    styles are inline and nothing is loaded from elsewhere, so it renders the same in
    Jupyter and in a notebook viewer that strips scripts and style sheets.
    """
    return _fragment([e for e in events if isinstance(e, Mapping)])


def trajectory_html(events: Iterable[Event], title: str | None = None) -> str:
    """A trajectory as one self-contained HTML page (``rlm view LOG --html OUT``).

    The page is the fragment of ``trajectory_fragment_html`` in a minimal document with
    a title: no scripts, no external assets, collapsible parts through ``<details>``.
    """
    events = [e for e in events if isinstance(e, Mapping)]
    if title is None:
        m = _metrics_from_events(events) if events else _Metrics()
        page_title = f"RLM trajectory · {_preview(m.query, 80)}" if m.query else "RLM trajectory"
        title = "RLM trajectory"
    else:
        page_title = title
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(page_title)}</title>\n</head>\n"
        '<body style="margin:0;padding:16px;background:#f6f8fa">\n'
        f"{_fragment(events, title=title)}\n</body>\n</html>\n"
    )


# -- results ---------------------------------------------------------------------------


def result_html(result: Any) -> str:
    """An ``RLMResult`` as HTML for a notebook (its ``_repr_html_``).

    Answer first, then the metrics (the result's own numbers: iterations, root and sub
    usage, sub-calls, wall time, stopped reason), then the iterations from its
    trajectory, collapsible, with highlighted code. Any object with those attributes
    works; missing ones are shown as dashes.
    """
    events = [e for e in (_get(result, "trajectory", []) or []) if isinstance(e, Mapping)]
    return _fragment(events, metrics=_metrics_from_result(result), title="RLM result")


def result_rich(result: Any) -> RenderableType:
    """An ``RLMResult`` as a rich renderable for a terminal (its ``__rich__``): the
    answer in a panel with the key numbers, then the metrics table."""
    m = _metrics_from_result(result)
    return Group(_answer_panel(m), _metrics_table(m))


def _exec_fields(r: Any) -> dict[str, Any]:
    return {
        "stdout": _text(_get(r, "stdout", "")),
        "stderr": _text(_get(r, "stderr", "")),
        "error": _get(r, "error"),
        "final": _get(r, "final"),
        "duration_s": _get(r, "duration_s"),
        "sub_calls": _int(_get(r, "sub_calls")) or 0,
        "truncated": bool(_get(r, "truncated", False)),
    }


def _exec_summary(f: dict[str, Any]) -> str:
    bits = ["ExecResult", _fmt_time(f["duration_s"])]
    if f["sub_calls"]:
        bits.append(f"{f['sub_calls']:,} sub-calls")
    if f["truncated"]:
        bits.append("output truncated")
    bits.append("error" if f["error"] else "ok")
    return " · ".join(bits)


def exec_result_html(r: Any) -> str:
    """An ``ExecResult`` as HTML for a notebook (its ``_repr_html_``): a header with the
    duration, sub-calls and status, then stdout, stderr (amber), the error (red) and the
    final answer (green) when set, all escaped."""
    f = _exec_fields(r)
    parts = [f'<div style="{_S["cell_head"]}">{_esc(_exec_summary(f))}</div>']
    if f["stdout"]:
        parts.append(_pre(f["stdout"].rstrip("\n"), "pre"))
    if f["stderr"]:
        parts.append(_pre(f["stderr"].rstrip("\n"), "stderr"))
    if f["error"]:
        parts.append(_pre(_text(f["error"]), "error"))
    if f["final"] is not None:
        parts.append(_pre("FINAL → " + _text(f["final"]), "final"))
    if not (f["stdout"] or f["stderr"] or f["error"] or f["final"] is not None):
        parts.append(f'<div style="{_S["cell_head"]}">(no output)</div>')
    return f'<div style="{_S["root"]}">{"".join(parts)}</div>'


def exec_result_rich(r: Any) -> RenderableType:
    """An ``ExecResult`` as a rich renderable for a terminal (its ``__rich__``): the
    outputs in a panel titled with duration, sub-calls and status."""
    f = _exec_fields(r)
    parts: list[RenderableType] = []
    if f["stdout"]:
        parts.append(_output_text(f["stdout"], "", _TERM_MAX_LINES, _TERM_MAX_CHARS))
    if f["stderr"]:
        parts.append(_output_text(f["stderr"], "yellow", _TERM_MAX_LINES, _TERM_MAX_CHARS))
    if f["error"]:
        parts.append(_output_text(_text(f["error"]), "bold red", _TERM_MAX_LINES, _TERM_MAX_CHARS))
    if f["final"] is not None:
        parts.append(Text.assemble(("FINAL → ", "bold green"), _text(f["final"])))
    if not parts:
        parts.append(Text("(no output)", style="dim"))
    return Panel(Group(*parts), title=Text(_exec_summary(f), style="dim"), title_align="left",
                 border_style="red" if f["error"] else "cyan", padding=(0, 1))
