"""Progress of a job on stderr: done, failed, cost, tasks/s and ETA, then one summary line.

On a terminal it is a live bar; in a file or pipe (a CI log, a test) it prints a plain
line at most every ``every_s`` seconds, so a long job still shows it is alive.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["JobProgress"]


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}:{seconds % 60:02d}"


class JobProgress:
    """Counts finished tasks and shows the job's progress; ``enabled=False`` shows nothing."""

    def __init__(self, total: int, *, skipped: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, every_s: float = 5.0) -> None:
        # A callable giving more status for the line (batch mode: batches and waits).
        self.status: Callable[[], str] | None = None
        self.total = total
        self.skipped = skipped
        self.done = 0
        self.failed = 0
        self.cost_usd = 0.0
        self.started = time.monotonic()
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last_print = 0.0
        self._live: Any = None
        self._task: Any = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._live = Progress(
                TextColumn("[bold]rlm batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream),
                transient=True,
            )
            self._task = self._live.add_task("tasks", total=total, stats=self._stats())
            self._live.start()

    def rate(self) -> float:
        """Finished tasks per second so far."""
        elapsed = time.monotonic() - self.started
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0

    def _stats(self) -> str:
        rate = self.rate()
        left = self.total - self.done - self.failed
        eta = left / rate if rate > 0 else None
        text = (f"failed {self.failed}  ${self.cost_usd:.4f}  {rate:.1f} tasks/s  "
                f"ETA {_eta(eta)}")
        if self.status is not None:
            try:
                extra = self.status()
            except Exception:  # noqa: BLE001 - a status line must not stop the job
                extra = ""
            if extra:
                text += f"  {extra}"
        return text

    def advance(self, ok: bool, cost_usd: float) -> None:
        """Count one finished task."""
        with self._lock:
            if ok:
                self.done += 1
            else:
                self.failed += 1
            self.cost_usd += cost_usd
            self._show()

    def refresh(self) -> None:
        """Show the line again with the latest status (nothing finished meanwhile)."""
        with self._lock:
            self._show()

    def _show(self) -> None:
        # The caller holds the lock.
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self._task, completed=self.done + self.failed, stats=self._stats())
            return
        now = time.monotonic()
        if now - self._last_print >= self.every_s:
            self._last_print = now
            print(f"rlm batch: {self.done + self.failed}/{self.total}  {self._stats()}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        """Remove the live bar (the summary line is printed by the caller)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
