"""The local backend: the job's tasks run as concurrent runs of one RLM in this process.

Every task shares the RLM's clients (one connection pool, one limiter) and runs on the
engine loop; ``concurrency`` workers each take the next task, load its context, run it
and drop the context, so memory holds at most ``concurrency`` contexts at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from rlm.jobs.budget import JobBudget
from rlm.jobs.output import error_record, result_record
from rlm.jobs.tasks import Task

__all__ = ["run_tasks"]

Finished = Callable[[dict[str, Any]], None]


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


async def run_one(rlm: Any, task: Task) -> dict[str, Any]:
    """Load ``task``'s context, run it on ``rlm`` and return its output record."""
    started = time.monotonic()
    try:
        # Reading a large file must not stall the loop the other tasks run on.
        context = await asyncio.to_thread(task.load_context)
    except Exception as exc:  # noqa: BLE001 - a task's bad input is its own failure
        return error_record(task.id, f"context: {_short(exc)}", time.monotonic() - started)
    try:
        result = await rlm.acompletion(context=context, query=task.query)
    except Exception as exc:  # noqa: BLE001 - e.g. an empty query: the task fails, not the job
        return error_record(task.id, _short(exc), time.monotonic() - started)
    finally:
        del context
    return result_record(task.id, result)


async def run_tasks(
    rlm: Any, tasks: Iterator[Task], finished: Finished, budget: JobBudget, concurrency: int
) -> str | None:
    """Run ``tasks`` with ``concurrency`` at a time; ``finished(record)`` as each ends.

    Returns None when every task ran, or the job cap that stopped new tasks. When the
    job's ``max_time_s`` runs out, running tasks are cancelled (their output lines are
    never written, so a re-run does them).
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
            finished(await run_one(rlm, task))

    workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        left = budget.remaining_time()
        done, pending = await asyncio.wait(workers, timeout=left)
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
