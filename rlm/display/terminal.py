"""The terminal faces of a run: the live view (LiveDisplay, RLM(verbose=True)) and a whole
log rendered after the fact (render_log, rlm view).

Everything an event carries is untrusted (a document, a model's reply, a cell's output,
a log file someone handed over): it is shown through ``clean_text`` as rich ``Text`` (or
Markdown without hyperlinks, or highlighted code), never parsed as markup, so no escape
sequence reaches the terminal and no bracket can break the view."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.markdown import Markdown
from rich.panel import Panel
from rich.rule import Rule
from rich.segment import Segment
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from rlm.display.formatting import (
    CellNumbers,
    Event,
    as_int,
    as_num,
    as_text,
    clean_text,
    depth_of,
    field_of,
    fmt_cost,
    fmt_int,
    fmt_time,
    head_tail,
    preview,
    prose_of,
    run_key,
    schema_issues_text,
    sub_calls_text,
    token_notes,
)
from rlm.display.metrics import Metrics, metrics_from_events
from rlm.display.progress import SubqueryProgress

# Terminal outputs are cut to a head and a tail: a 20,000-character cell output would
# push everything else off the screen, and its end (the totals, the error) matters most
# after its beginning.
TERM_MAX_LINES = 24
TERM_MAX_CHARS = 3_000



def output_text(text: str, style: str, max_lines: int, max_chars: int, indent: str = "") -> Text:
    """A cell output cut to its head and tail, cleaned, as Text."""
    head, omitted, tail = head_tail(clean_text(text).rstrip("\n"), max_lines, max_chars)
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


class _Indented:
    """A renderable shifted right by ``indent`` columns at the width that is left.

    rich's Padding either shrinks the body to its narrowest (rules collapse to one
    character, panels lose their width) or pads every line with trailing spaces; a
    child run's view needs neither.
    """

    def __init__(self, body: RenderableType, indent: int) -> None:
        self.body = body
        self.indent = indent

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(20, options.max_width - self.indent)
        pad = Segment(" " * self.indent)
        for line in console.render_lines(self.body, options.update_width(width), pad=False):
            yield pad
            yield from line
            yield Segment.line()


def metrics_table(m: Metrics, title: str = "Metrics") -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAVY, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", overflow="fold")
    for label, value in m.rows():
        # Text, not str: a str cell is parsed as markup, and a model named "x-[/y]" broke it.
        table.add_row(Text(label), Text(clean_text(value)))
    return table


def answer_panel(m: Metrics) -> RenderableType:
    """The answer in a panel coloured by how the run ended, then its key numbers on a
    line of their own (as a panel subtitle they were cut at narrow widths)."""
    failed = m.answer is None
    limit = not failed and m.stopped_reason == "max_iterations"
    if failed:
        body = Text(f"no answer ({clean_text(m.stopped_reason or 'unknown')})", style="bold red")
        if m.error:
            body.append("\n" + clean_text(m.error), style="red")
        title, border = "[bold]Answer[/]", "red"
    elif limit:
        body = Text(clean_text(m.answer))
        title, border = "[bold]Answer[/] [yellow]· iteration limit, no FINAL[/]", "yellow"
    else:
        body = Text(clean_text(m.answer))
        title, border = "[bold]Answer[/]", "green"
    panel = Panel(body, title=title, border_style=border, padding=(0, 1))
    return Group(panel, Text(clean_text(m.summary()), style="dim", justify="right"))


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
        max_output_lines: int = TERM_MAX_LINES,
        max_output_chars: int = TERM_MAX_CHARS,
        show_sub_queries: bool = False,
        max_sub_queries_shown: int = 3,
    ) -> None:
        self.console = console if console is not None else Console()
        self.show_sub_queries = show_sub_queries
        self.max_sub_queries_shown = max_sub_queries_shown
        self._cells = CellNumbers()
        # Each run's max_iterations (from run_start): a later iteration is the last turn.
        self._limits: dict[str, int] = {}
        self.max_output_lines = max_output_lines
        self.max_output_chars = max_output_chars
        self._lock = threading.RLock()
        self._progress = SubqueryProgress(self.console)
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
            key = run_key(event)
            self._events.setdefault(key, []).append(event)
            if kind in ("cell_result", "run_end", "error", "budget"):
                # A batch that ended early (an error in the cell) never reports total/total.
                self._finish_batches(key)
            parts = self._render(event)
            if kind == "run_end":
                self._events.pop(key, None)
                self._iteration_shown.pop(key, None)
                self._limits.pop(key, None)
                self._cells.forget(key)
            if not parts:
                return
            depth = depth_of(event)
            body: RenderableType = parts[0] if len(parts) == 1 else Group(*parts)
            if depth:
                body = _Indented(body, 4 * depth)
            # One print per event: rich renders it whole under its own lock, so lines
            # from events on different threads never interleave.
            self.console.print(body)

    def close(self) -> None:
        """Take down any progress line still showing (a run interrupted mid-batch)."""
        with self._lock:
            self._progress.finish()

    def _finish_batches(self, key: str) -> None:
        self._progress.finish_prefix(key + "\x00")

    def _subcalls(self, event: Event) -> None:
        done, total = as_int(event.get("done")) or 0, as_int(event.get("total")) or 0
        depth = depth_of(event)
        label = "sub-queries" if not depth else f"{'  ' * depth}[d{depth}] sub-queries"
        # One line per run; a batch id, when the engine sends one, separates concurrent batches.
        key = run_key(event) + "\x00" + as_text(event.get("batch"))
        self._progress.update(key, label, done, total)

    # One method per event type keeps the look of each in one place.
    def _render(self, event: Event) -> list[RenderableType]:
        kind = as_text(event.get("type"))
        method = getattr(self, f"_render_{kind}", None)
        if method is None:
            return []
        parts: list[RenderableType] = []
        iteration = as_int(event.get("iteration"))
        key = run_key(event)
        if iteration is not None and self._iteration_shown.get(key) != iteration:
            self._iteration_shown[key] = iteration
            parts.append(self._iteration_rule(event, iteration))
        parts.extend(method(event))
        return parts

    @staticmethod
    def _tag(event: Event) -> str:
        depth = depth_of(event)
        return f"[d{depth}] " if depth else ""

    def _iteration_rule(self, event: Event, iteration: int) -> RenderableType:
        limit = self._limits.get(run_key(event))
        if limit is not None and iteration > limit:
            label = f"{self._tag(event)}last turn · iteration limit {limit} reached"
            return Rule(Text(label, style="bold yellow"), align="left", style="yellow")
        label = f"{self._tag(event)}iteration {iteration}"
        return Rule(Text(label, style="bold"), align="left", style="blue" if not depth_of(event) else "dim blue")

    def _render_run_start(self, event: Event) -> list[RenderableType]:
        query = as_text(event.get("query"))
        limit = as_int(event.get("max_iterations"))
        if limit is not None:
            self._limits[run_key(event)] = limit
        if depth_of(event):
            # What the parent asked: the prompt it sent (older logs: the generic instruction).
            asked = as_text(event.get("prompt")) or query
            return [Text.assemble((f"{self._tag(event)}↳ sub-RLM asked: ", "bold magenta"),
                                  clean_text(preview(asked, 200)))]
        model = as_text(event.get("model")) or "?"
        sub = as_text(event.get("recursive_model"))
        title = f"RLM · {model}" + (f" (sub: {sub})" if sub and sub != model else "")
        parts: list[RenderableType] = [Rule(Text(clean_text(title), style="bold"), style="magenta")]
        parts.append(Text.assemble(("Query: ", "bold"), clean_text(query)))
        context = event.get("context")
        if context:
            head, omitted, _ = head_tail(clean_text(context), 8, 800)
            parts.append(Text.assemble(("Context: ", "bold"), (head.rstrip() + (" …" if omitted else ""), "dim")))
        return parts

    def _render_root_request(self, event: Event) -> list[RenderableType]:
        return []  # The iteration rule printed for it says the turn has started.

    def _render_root_reply(self, event: Event) -> list[RenderableType]:
        prose = prose_of(as_text(event.get("content")), first_cell=self._cells.next_number(event))
        usage = event.get("usage")
        prompt, completion = as_int(field_of(usage, "prompt_tokens")), as_int(field_of(usage, "completion_tokens"))
        stats = f"root: {fmt_int(prompt)} → {fmt_int(completion)} tokens"
        notes = token_notes(usage)
        if notes:
            stats += f" · {notes}"
        stats += f" · {fmt_cost(field_of(usage, 'cost_usd'))} · {fmt_time(event.get('elapsed_s'))}"
        if event.get("cached"):
            stats += " · from the cache"
        if not prose:
            return [Text(stats, style="dim")]
        return [
            Panel(
                # No hyperlinks: a link would show its text and hide where it leads.
                Markdown(clean_text(prose), hyperlinks=False),
                title=Text(f"{self._tag(event)}root", style="bold blue"),
                title_align="left",
                subtitle=Text(stats, style="dim"),
                subtitle_align="right",
                border_style="dim blue",
                padding=(0, 1),
            )
        ]

    def _render_cell(self, event: Event) -> list[RenderableType]:
        code = clean_text(event.get("code")).rstrip("\n")
        return [
            Panel(
                Syntax(code, "python", theme="ansi_dark", word_wrap=True, background_color="default"),
                title=Text(f"{self._tag(event)}cell {self._cells.number(event)}", style="bold cyan"),
                title_align="left",
                border_style="cyan",
                padding=(0, 1),
            )
        ]

    def _render_cell_result(self, event: Event) -> list[RenderableType]:
        parts: list[RenderableType] = []
        for name, style in (("stdout", ""), ("stderr", "yellow"), ("error", "bold red")):
            value = as_text(event.get(name))
            if value.strip():
                parts.append(output_text(value, style, self.max_output_lines,
                                          self.max_output_chars, indent="  "))
        final = event.get("final")
        if final is not None:
            parts.append(Text.assemble(("  FINAL → ", "bold green"), clean_text(preview(final, 300))))
        info = [f"cell {self._cells.number(event)}", fmt_time(event.get("duration_s"))]
        sub_calls = as_int(event.get("sub_calls"))
        if sub_calls:
            info.append(sub_calls_text(sub_calls, as_int(event.get("cached_sub_calls"))))
        if event.get("truncated"):
            info.append("output truncated")
        if event.get("error"):
            info.append("error")
        parts.append(Text("  ⎿ " + " · ".join(info), style="dim"))
        return parts

    def _render_sub_queries(self, event: Event) -> list[RenderableType]:
        calls = event.get("calls")
        if not self.show_sub_queries or not isinstance(calls, list) or not calls:
            return []
        shown = calls[: self.max_sub_queries_shown]
        out = Text()
        for call in shown:
            out.append("  ↳ ", style="magenta")
            out.append(clean_text(preview(field_of(call, "prompt", ""), 70)), style="dim")
            out.append("  →  ", style="magenta")
            if field_of(call, "cached"):
                out.append("(cached) ", style="dim green")
            out.append(clean_text(preview(field_of(call, "reply", ""), 60)) + "\n")
        if len(calls) > len(shown):
            out.append(f"  … {len(calls) - len(shown):,} more (rlm view LOG --html OUT shows them all)\n",
                       style="dim italic")
        out.rstrip()
        return [out]

    def _render_final(self, event: Event) -> list[RenderableType]:
        source = as_text(event.get("source"))
        if source == "last_turn":
            return [Text.assemble((f"{self._tag(event)}⚠ no FINAL before the iteration limit: ", "bold yellow"),
                                  ("the answer is the root's last-turn reply", "yellow"))]
        return [Text.assemble((f"{self._tag(event)}✓ final answer", "bold green"),
                              (f" ({clean_text(source)})" if source else "", "dim"))]

    def _render_answer_invalid(self, event: Event) -> list[RenderableType]:
        return [Text.assemble((f"{self._tag(event)}✗ answer refused by the schema: ", "bold yellow"),
                              clean_text(schema_issues_text(event)))]

    def _render_retry(self, event: Event) -> list[RenderableType]:
        # The root's retries show one by one (a stopped server must not look like a
        # hang); a sub-query batch's are summed up by its rate_limited event.
        if event.get("role") != "root":
            return []
        # The model name can come from cell code and the failure quotes a server's body.
        return [Text(clean_text(f"{self._tag(event)}↻ {as_text(event.get('model'))}: attempt "
                                f"{as_int(event.get('attempt')) or 1} failed "
                                f"({as_text(event.get('failure'))}); next try in "
                                f"{fmt_time(as_num(event.get('wait_s')))}"), style="yellow")]

    def _render_rate_limited(self, event: Event) -> list[RenderableType]:
        limits = event.get("limits") if isinstance(event.get("limits"), Mapping) else {}
        paced = [f"{k} {as_num(limits.get(k)):,.0f} ({as_text(limits.get(k + '_from'))})"
                 for k in ("rpm", "tpm") if as_num(limits.get(k))]
        if as_num(limits.get("rate_per_s")):
            paced.append(f"{as_num(limits.get('rate_per_s')):,.1f} requests/s learned from 429s")
        return [Text(clean_text(f"{self._tag(event)}⏸ rate limits held the {as_text(event.get('role'))} "
                                f"model {as_text(event.get('model'))} back "
                                f"{fmt_time(as_num(event.get('waited_s')))}, "
                                f"{as_int(event.get('refusals')) or 0:,} refusals"
                                + (f"; pacing to {', '.join(paced)}" if paced else "")),
                     style="dim yellow")]

    def _render_budget(self, event: Event) -> list[RenderableType]:
        return [Text.assemble((f"{self._tag(event)}⚠ budget: ", "bold yellow"), clean_text(event.get("reason")))]

    def _render_error(self, event: Event) -> list[RenderableType]:
        return [Text.assemble((f"{self._tag(event)}✗ error: ", "bold red"), clean_text(event.get("message")))]

    def _render_run_end(self, event: Event) -> list[RenderableType]:
        m = metrics_from_events(self._events.get(run_key(event), [event]), run_key(event))
        if depth_of(event):
            answer = "no answer" if m.answer is None else clean_text(preview(m.answer, 200))
            return [Text.assemble((f"{self._tag(event)}↳ sub-RLM answer: ", "bold magenta"), answer,
                                  (f"  ({clean_text(m.summary())})", "dim"))]
        return [answer_panel(m)]


def render_log(events: Iterable[Event], console: Console | None = None, *,
               show_sub_queries: bool = True) -> None:
    """Render a whole trajectory (e.g. from ``read_log``) to the terminal.

    It looks like the live view of the same run (each iteration with the root's text,
    highlighted code and outputs, then the answer), followed by a metrics table per
    top-level run: iterations, root calls, tokens and cost, sub-calls, tokens and cost,
    wall time and why the run stopped. A log cut short by a killed run renders up to
    where it ends, and its table says it is incomplete. ``show_sub_queries`` lists the
    first few recorded sub-queries (prompt → reply) under their cell.
    """
    console = console if console is not None else Console()
    events = [e for e in events if isinstance(e, Mapping)]
    view = LiveDisplay(console, show_sub_queries=show_sub_queries)
    for event in events:
        view(event)
    for key in _top_level_keys(events):
        console.print(metrics_table(metrics_from_events(events, key)))


def _top_level_keys(events: list[Event]) -> list[str]:
    keys: list[str] = []
    for e in events:
        key = run_key(e)
        if depth_of(e) == 0 and key not in keys:
            keys.append(key)
    return keys


