"""Progress lines: a batch of RLM tasks (BatchProgress) and a run's sub-query batches
(SubqueryProgress), each as a rich bar in a terminal, one output updated in place in a
notebook, and a few plain lines in a file (a CI log)."""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from rlm.display.formatting import as_int, clean_text, fmt_time
from rlm.display.markup import MONO

# A notebook output is a message to the browser; more than two a second is noise.
NOTEBOOK_REFRESH_S = 0.5


class SubqueryProgress:
    """Sub-query progress lines for a console: a rich bar in a terminal, one updating
    output in a notebook, and one line per finished batch in a plain file (a CI log)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._notebook: dict[str, NotebookLine] = {}
        self._started: dict[str, float] = {}

    def update(self, key: str, label: str, done: int, total: int) -> None:
        finished = total > 0 and done >= total
        first = key not in self._started
        if first:
            self._started[key] = time.monotonic()
        if self.console.is_jupyter:
            line = self._notebook.get(key)
            if line is None:
                line = self._notebook[key] = NotebookLine()
            elapsed = time.monotonic() - self._started[key]
            line.show(progress_html(label, done, total, 0, elapsed, None),
                      progress_text(label, done, total, 0, elapsed, None), force=finished)
        elif self.console.is_interactive:
            if self._bar is None:
                self._bar = new_bar(self.console, transient=True)
                self._bar.start()
            if key not in self._tasks:
                self._tasks[key] = self._bar.add_task(label, total=total or None, failed="")
            self._bar.update(self._tasks[key], completed=done, total=total or None)
        elif finished:
            # A file gets no redraws: one line per batch, when it is done. A start line
            # would read "1/50" while nothing is done yet, and batches running at once in
            # one run share a line here, so their starts and ends would interleave.
            elapsed = time.monotonic() - self._started[key]
            self.console.print(Text(progress_text(label, done, total, 0, elapsed, None), style="dim"))
        if finished:
            self.finish(key)

    def finish_prefix(self, prefix: str) -> None:
        """Drop every batch line whose key starts with ``prefix`` (one run's batches)."""
        for key in [k for k in self._started if k.startswith(prefix)]:
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


def new_bar(console: Console, *, transient: bool) -> Progress:
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


class NotebookLine:
    """One notebook output updated in place, at most every half second.

    It uses IPython's display handles, not widgets: rich's Jupyter live display needs
    ipywidgets (without it rich only warns and shows nothing), and a widget's state is
    lost in a saved notebook, while a display handle's last HTML stays readable on a
    code host.
    """

    def __init__(self, interval_s: float = NOTEBOOK_REFRESH_S) -> None:
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


def progress_text(label: str, done: int, total: int, failed: int,
                   elapsed: float | None, eta: float | None) -> str:
    parts = [f"{label} {done:,}/{total:,}" if total else f"{label} {done:,}"]
    if failed:
        parts.append(f"{failed:,} failed")
    if elapsed is not None:
        parts.append(fmt_time(elapsed))
    if eta is not None:
        parts.append(f"ETA {fmt_time(eta)}")
    return " · ".join(parts)


def progress_html(label: str, done: int, total: int, failed: int,
                   elapsed: float | None, eta: float | None) -> str:
    bar = (
        f'<progress value="{done}" max="{max(total, 1)}" style="width:16em;vertical-align:middle"></progress> '
        if total else ""
    )
    text = html.escape(progress_text(label, done, total, failed, elapsed, eta))
    if failed:
        text = text.replace(html.escape(f"{failed:,} failed"),
                            f'<span style="color:#cf222e">{failed:,} failed</span>')
    return f'<div style="font-family:{MONO};font-size:12.5px">{bar}{text}</div>'


class BatchProgress:
    """Progress of many tasks at once: done, failed, elapsed and ETA.

    ``start(total)``, then ``advance(ok)`` as each task ends (from any thread), then
    ``stop()``; also a context manager. In a terminal it is a rich progress bar; in a
    notebook one output updated in place at most every ``refresh_s`` seconds (no widget
    needed); in a plain file (a CI log) a line at each quarter and at the end.
    """

    def __init__(self, description: str = "tasks", console: Console | None = None,
                 *, refresh_s: float = NOTEBOOK_REFRESH_S) -> None:
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
        self._line: NotebookLine | None = None
        self._next_quarter = 0
        self._printed = -1

    def start(self, total: int) -> None:
        """Show the bar for ``total`` tasks (none done yet)."""
        with self._lock:
            self.total, self.done, self.failed = max(0, int(total)), 0, 0
            self._started_at = time.monotonic()
            if self.console.is_jupyter:
                self._line = NotebookLine(self.refresh_s)
            elif self.console.is_interactive:
                self._bar = new_bar(self.console, transient=False)
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
            self._line.show(progress_html(*args), progress_text(*args), force=force)
            if final:
                self._line.flush()
        else:
            # Quarters, not every update: a file keeps every line forever.
            quarter = self.done * 4 // self.total if self.total else 0
            due = quarter >= self._next_quarter or (final and self._printed != self.done)
            if due and self._printed != self.done:
                self._next_quarter = quarter + 1
                self._printed = self.done
                text = progress_text(self.description, self.done, self.total, self.failed, elapsed, eta)
                self.console.print(Text(text, style="dim"))




class RunProgress:
    """One transient status line for a run without the live view (``rlm run`` on a
    terminal): the iteration, what is happening now, sub-queries done and the time.

    A trajectory sink like ``LiveDisplay``: call it with each event, ``close()`` at the
    end (the line disappears, leaving the terminal as it was). Child runs update the
    same line. Thread-safe.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._iteration: int | None = None
        self._limit: int | None = None
        self._doing = "starting"
        self._sub_done = 0
        self._sub_total = 0
        self._sub_finished = 0
        self._retry: str | None = None
        self._live: Live | None = None

    def __call__(self, event: Mapping[str, Any]) -> None:
        """Take one event into the status line."""
        if not isinstance(event, Mapping):
            return
        with self._lock:
            kind = event.get("type")
            top = not as_int(event.get("depth")) and not event.get("child_run")
            # A retry shows until the next thing happens (what failed, the next try).
            self._retry = None
            if kind == "retry":
                # Untrusted: the model name can come from cell code, the failure quotes
                # a server's error body.
                self._retry = clean_text(
                    f"retrying {event.get('model')} after {event.get('failure')} "
                    f"(attempt {as_int(event.get('attempt')) or 1}; next try in "
                    f"{fmt_time(event.get('wait_s'))})")
            elif kind == "run_start" and top:
                self._limit = as_int(event.get("max_iterations"))
            elif kind == "root_request" and top:
                self._iteration = as_int(event.get("iteration"))
                self._doing = "waiting for the root model"
            elif kind == "cell" and top:
                self._doing = "running a cell"
            elif kind == "subcalls":
                self._sub_done = as_int(event.get("done")) or 0
                self._sub_total = as_int(event.get("total")) or 0
            elif kind == "sub_queries" and isinstance(event.get("calls"), list):
                self._sub_finished += len(event["calls"])
                self._sub_done = self._sub_total = 0
            elif kind == "run_end" and top:
                self._doing = "done"
            if self._live is None and self._doing != "done":
                # Rendered at each refresh, not only at events: the time keeps ticking
                # while the root model thinks or a server keeps refusing.
                self._live = Live(console=self.console, transient=True, get_renderable=self._line,
                                  refresh_per_second=4, redirect_stdout=False, redirect_stderr=False)
                self._live.start()
            elif self._live is not None:
                self._live.refresh()

    def close(self) -> None:
        """Take the line down."""
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def _line(self) -> Text:
        parts = ["rlm"]
        if self._iteration is not None:
            if self._limit is not None and self._iteration > self._limit:
                parts.append("last turn (iteration limit)")
            else:
                parts.append(f"iteration {self._iteration}" + (f"/{self._limit}" if self._limit else ""))
        parts.append(self._retry or self._doing)
        if self._sub_total:
            parts.append(f"sub-queries {self._sub_done:,}/{self._sub_total:,}")
        elif self._sub_finished:
            parts.append(f"{self._sub_finished:,} sub-queries done")
        parts.append(fmt_time(time.monotonic() - self._started))
        return Text(" · ".join(parts), style="dim", no_wrap=True, overflow="ellipsis")
