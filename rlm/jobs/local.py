"""The local backend: the job's tasks run as concurrent runs of one RLM in this process.

Every task shares the RLM's clients (one connection pool, one limiter) and runs on the
engine loop; ``concurrency`` workers each take the next task, load its context, run it
and drop the context, so memory holds at most ``concurrency`` contexts at a time.
Every task's run draws from the job's ledger, so the job's caps bind per model call
(see ``rlm.jobs.budget``).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from rlm.gc_tuning import MANY_RUNS, fewer_full_collections
from rlm.jobs.budget import JobBudget
from rlm.jobs.output import error_record, result_record
from rlm.jobs.tasks import Task
from rlm.usage import BudgetLedger, spending_from

__all__ = ["run_tasks"]

Finished = Callable[[dict[str, Any]], None]


class _Reclaimer:
    """Collects cyclic garbage once enough context bytes are held by finished runs.

    A REPL drops its context when it closes, so a finished run normally leaves none
    behind. Should something made during the run still hold it (a reference cycle,
    which only a full collection frees, and the interpreter starts those by object
    counts, not bytes), its bytes are counted, and once they exceed what the running
    tasks hold (at least 32 MB) a full collection runs: the pile stays about
    ``concurrency x context size``. A context the run let go costs no collection (a
    full one walks every object in the process: a fifth of a job's CPU when it ran
    once per ``concurrency`` tasks regardless).
    """

    def __init__(self, floor: int = 32 << 20) -> None:
        self.floor = floor
        self.pending = 0
        self._lock = threading.Lock()

    def released(self, context: Any, concurrency: int, held_before: int) -> None:
        """A run over ``context`` ended; ``held_before`` is ``sys.getrefcount(context)``
        taken by the caller before the run."""
        if held_before > _EXCLUSIVE:
            # Held elsewhere too (the caller's task list, other tasks sharing it): a
            # collection could not free it, so it is not watched.
            return
        # This frame's parameter is one more reference than the caller had before.
        if sys.getrefcount(context) <= held_before + 1:
            return
        size = len(context) if isinstance(context, str | bytes | bytearray) else 1 << 20
        with self._lock:
            self.pending += size
            if self.pending < max(self.floor, concurrency * size):
                return
            self.pending = 0
        gc.collect()


# References to a context only its own task holds, as sys.getrefcount counts them in
# run_one: its variable, the call's argument and the task's inline copy.
_EXCLUSIVE = 3
_reclaimer = _Reclaimer()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# How long past the job's deadline running tasks get to stop by themselves (their runs
# see the deadline through the job ledger and end with stopped_reason "budget") before
# they are cancelled and left to a re-run.
DEADLINE_GRACE_S = 10.0


async def run_one(rlm: Any, task: Task, concurrency: int = 1, schema: Any = None,
                  ledger: BudgetLedger | None = None, prelude: str | None = None) -> dict[str, Any]:
    """Load ``task``'s context, run it on ``rlm`` (with ``schema``, for a typed answer) and
    return its output record; ``concurrency`` (tasks at once here) paces memory reclaiming,
    and the run also spends from ``ledger`` (the job's), per call, when one is given.
    ``prelude`` is code run in the task's REPL before the run (unrecorded; batch mode
    seeds ``random`` with it)."""
    started = time.monotonic()
    try:
        # Reading a file must not stall the loop the other tasks run on; an inline
        # context needs no thread (the pool is busy starting and closing REPLs).
        if task.context_path is None and task.line_ref is None:
            context = task.context
        else:
            context = await asyncio.to_thread(task.load_context)
    except Exception as exc:  # noqa: BLE001 - a task's bad input is its own failure
        return error_record(task.id, f"context: {_short(exc)}", time.monotonic() - started)
    held = sys.getrefcount(context)
    env = None
    try:
        with spending_from(ledger):
            if prelude is not None:
                env = await asyncio.to_thread(rlm.new_env, context)
                await env.aexecute(prelude)
            # Only a prelude needs its own env (other runners take no env= at all).
            extra = {"env": env} if env is not None else {}
            result = await rlm.acompletion(context=context, query=task.query, schema=schema,
                                           **extra)
    except Exception as exc:  # noqa: BLE001 - e.g. an empty query: the task fails, not the job
        return error_record(task.id, _short(exc), time.monotonic() - started)
    finally:
        if env is not None:
            await asyncio.to_thread(env.close)
        _reclaimer.released(context, concurrency, held)
        del context, env
    return result_record(task.id, result)


async def run_tasks(
    rlm: Any, tasks: Iterator[Task], finished: Finished, budget: JobBudget, concurrency: int,
    schema: Any = None,
) -> str | None:
    """Run ``tasks`` with ``concurrency`` at a time; ``finished(record)`` as each ends.

    Returns None when every task ran, or the job cap that stopped new tasks. Every run
    spends from ``budget.ledger``, so a spent job cap or the job's ``max_time_s`` stops
    running tasks too (their lines say ``stopped_reason="budget"``); a task still
    running ``DEADLINE_GRACE_S`` after the deadline is cancelled (its line is never
    written, so a re-run does it).
    """
    stop: list[str] = []

    async def worker() -> None:
        while True:
            reason = budget.stop_reason()
            if reason is not None:
                stop.append(reason)
                return
            task = next(tasks, None)
            if task is None:
                return
            finished(await run_one(rlm, task, concurrency, schema, budget.ledger))

    workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        left = budget.remaining_time()
        with fewer_full_collections(concurrency >= MANY_RUNS):
            done, pending = await asyncio.wait(
                workers, timeout=None if left is None else left + DEADLINE_GRACE_S
            )
        if pending:
            stop.append(budget.stop_reason() or f"job max_time_s={budget.max_time_s:g} reached")
            budget.interrupt()
        for task in done:
            task.result()  # a bug in a worker must surface, not vanish
    except asyncio.CancelledError:
        budget.interrupt()
        raise
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return stop[0] if stop else None
