"""The batch-mode backend: a job's model calls go through the providers' Batch APIs.

Every task runs as a series of tries (see ``rlm.batchapi.replay``): a try runs the task
from the start and parks on the first call that is not answered yet, which goes into a
provider batch; the try ends, holding nothing, and once every call it parked on has an
outcome the task is tried again. At most ``concurrency`` tries run at once, whatever the
number of waiting tasks. When no try is running or about to run, every task is waiting,
so the open batch files are submitted at once instead of after their window: a job's
steps then make about one batch per model each.

A task's random module is seeded the same way on each try (from its id), so a cell that
draws from it asks the same questions again; a task whose tries stop getting further
(``BatchSettings.max_replays`` in a row) is finished on the live API. The try that
finishes is an ordinary run whose earlier calls came from the job's replies: its record
is the task's line. Tries that parked write nothing (their trajectory logs are removed).
On Ctrl-C or SIGTERM the open batches are cancelled and what they finished is kept; a
re-run of the same command picks the job's state up (``rlm.batchapi.journal``). This
module must not hold the Batch API machinery itself (``rlm.batchapi``) or what every
backend shares (``rlm.jobs.runner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import zlib
from collections.abc import Callable
from typing import Any

from rlm import loop as engine
from rlm.batchapi.handle import on_engine
from rlm.batchapi.replay import Attempt, BatchService
from rlm.batchapi.settings import BatchSettings
from rlm.jobs.budget import JobBudget
from rlm.jobs.local import DEADLINE_GRACE_S, run_one
from rlm.jobs.progress import JobProgress
from rlm.jobs.tasks import Task
from rlm.usage import BudgetLedger

__all__ = ["BatchRunner", "seed_prelude"]

Finished = Callable[[dict[str, Any]], None]


def seed_prelude(task: Task) -> str:
    """The code that seeds a task's ``random`` the same way on every try."""
    seed = zlib.crc32(task.key.encode("utf-8"))
    return f"import random\nrandom.seed({seed})\ndel random"


class BatchRunner:
    """Runs one job's tasks in batch mode (the local backend's counterpart).

    ``run`` returns like ``rlm.jobs.local.run_tasks``: None when every task ran, else
    the job cap that stopped it. ``counts()`` gives the Batch API figures for the
    summary: batches, lines, retries, live calls, and tasks finished live.
    """

    def __init__(self, rlm: Any, settings: BatchSettings, state_dir: str | os.PathLike[str],
                 budget: JobBudget, concurrency: int, schema: Any = None,
                 bar: JobProgress | None = None) -> None:
        self.rlm = rlm
        self.settings = settings
        self.budget = budget
        self.concurrency = concurrency
        self.schema = schema
        self.bar = bar
        # New calls reserve against the job's caps when they join a batch and settle when
        # their line comes back, priced like the RLM's runs price them.
        ledger = None
        if budget.ledger is not None:
            ledger = BudgetLedger(prices={**rlm.client.prices, **rlm.sub_client.prices,
                                          **rlm.prices}, parent=budget.ledger)
        self.service = BatchService(settings, state_dir, [rlm.client, rlm.sub_client],
                                    job_ledger=ledger)
        self.tries = 0
        self.live_tasks = 0
        self.waiting = 0
        self._wanting = 0  # tries running or queued for a slot
        self._slots = asyncio.Semaphore(concurrency)
        self._stop: list[str] = []

    def counts(self) -> dict[str, Any]:
        """The Batch API figures of this job so far."""
        return {**self.service.counts(), "tries": self.tries, "live_tasks": self.live_tasks}

    def status_text(self) -> str:
        """Batch status for the progress line: open batches, pending calls, waiting tasks."""
        c = self.service.counts()
        text = (f"batches {c.get('batches', 0)} sent/{c.get('open_batches', 0)} open  "
                f"calls pending {c.get('pending', 0):,}  tasks waiting {self.waiting:,}")
        turnaround, oldest = c.get("turnaround_s"), c.get("oldest_open_s")
        if turnaround is not None and oldest is not None:
            text += f"  next results ~{max(0.0, turnaround - oldest):.0f}s"
        return text

    async def run(self, tasks: list[Task], finished: Finished) -> str | None:
        """Run ``tasks``; ``finished(record)`` as each ends."""
        try:
            await on_engine(self.service.start())
        except BaseException:
            await asyncio.shield(on_engine(self.service.close()))
            raise
        if self.bar is not None:
            self.bar.status = self.status_text
        drivers = [asyncio.create_task(self._drive(task, finished)) for task in tasks]
        ticker = asyncio.create_task(self._tick()) if self.bar is not None else None
        cancelled = False
        try:
            left = self.budget.remaining_time()
            done, pending = await asyncio.wait(
                drivers, timeout=None if left is None else left + DEADLINE_GRACE_S
            ) if drivers else (set(), set())
            if pending:
                self._stop.append(self.budget.stop_reason()
                                  or f"job max_time_s={self.budget.max_time_s:g} reached")
                self.budget.interrupt()
            for driver in done:
                driver.result()  # a bug in a driver must surface, not vanish
        except asyncio.CancelledError:
            cancelled = True
            self.budget.interrupt()
            raise
        finally:
            for driver in drivers:
                driver.cancel()
            if ticker is not None:
                ticker.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
            if cancelled:
                # Ctrl-C or SIGTERM: stop paying for what nobody waits on; keep what ended.
                with contextlib.suppress(Exception):
                    await asyncio.shield(on_engine(self.service.cancel()))
            await asyncio.shield(on_engine(self.service.close()))
        return self._stop[0] if self._stop else None

    async def _tick(self) -> None:
        assert self.bar is not None
        while True:
            await asyncio.sleep(1.0)
            self.bar.refresh()

    async def _drive(self, task: Task, finished: Finished) -> None:
        """Try ``task`` until a try does not park, then hand its record over."""
        service = self.service
        stalled = 0
        before: set[str] = set()  # what the previous try waited for and got
        live = False
        while True:
            reason = self.budget.stop_reason()
            if reason is not None:
                self._stop.append(reason)
                return
            self._wanting += 1
            try:
                async with self._slots:
                    attempt = service.attempt(task.key, live=live)
                    self.tries += 1
                    try:
                        record = await run_one(self.rlm, task, self.concurrency, self.schema,
                                               attempt.ledger, seed_prelude(task))
                    finally:
                        service.release(attempt)
            finally:
                self._wanting -= 1
            if not attempt.parked:
                self._maybe_flush()
                if live:
                    self.live_tasks += 1
                finished(record)
                return
            _drop_log(record)
            # A replay is expected to use every answer its previous try waited for; one
            # that asks something else instead did not get further.
            stalled = stalled + 1 if not before <= attempt.used else 0
            if stalled >= self.settings.max_replays:
                live = True
            await self._wait(attempt)
            before = _answered(attempt)

    async def _wait(self, attempt: Attempt) -> None:
        self.waiting += 1
        try:
            self._maybe_flush()
            await attempt.wait()
        finally:
            self.waiting -= 1

    def _maybe_flush(self) -> None:
        if self._wanting == 0 and self.waiting:
            # Every task left is waiting: nothing more is coming for the open files.
            engine.engine_loop().call_soon_threadsafe(self.service.flush)


def _answered(attempt: Attempt) -> set[str]:
    return {e.key for e in attempt.waits
            if e.future.done() and not e.future.cancelled() and e.future.exception() is None}


def _drop_log(record: dict[str, Any]) -> None:
    # A try that parked is not the task's run: its trajectory would only mislead.
    path = record.get("log_path")
    if path:
        with contextlib.suppress(OSError):
            os.remove(path)

