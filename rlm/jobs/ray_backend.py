"""The Ray backend: the job's tasks run on a Ray cluster, results stream back here.

- Workers: one actor per worker process, each holding one RLM (its own engine loop,
  client, sandbox and workers) built by the driver's RLM class from ``RLM.settings()``.
  A worker gets a chunk of tasks, runs up to its share of ``concurrency`` of them at
  once and yields each output record as its task ends (a streaming generator), so
  results arrive while the chunk is still running.
- The driver (this process) is the only writer of the output: records come back to
  the runner's ``finished`` callback, exactly as with the local backend, so resume
  works the same.
- Contexts are read here, just before a chunk is sent (at most two chunks per worker
  are in flight), so the cluster needs no shared filesystem and memory stays bounded.
- Job budgets hold across workers: a small ledger actor counts what every worker's
  tasks spent, and a worker asks it before starting each task. Here the cost and
  token caps bind per task, not per model call as on the local backend: a call would
  need a round trip to the actor, so once a cap is reached no task starts, and the
  tasks already running (at most ``concurrency``) finish and may overshoot it by
  their whole usage. The job's ``max_time_s`` does bind per call: each worker gives
  its runs a local job ledger with the job's deadline, so at the deadline running
  tasks stop with ``stopped_reason="budget"`` like on the local backend.
- The sub-query cache: the workers' RLMs get the driver's ``cache=`` setting, so a
  cache directory (or True, the per-user one) is shared by every worker on a node
  through SQLite's WAL; workers on other nodes each use that path on their own node.
  A custom ``Cache`` object other than ``SQLiteCache`` cannot travel: ``ConfigError``.
- A worker that dies has the tasks of its chunk that had not reported re-queued on a
  new worker; the runner keeps one line per id, so none is duplicated.

Addresses: None starts a local cluster for the job (and stops it after); "auto" joins
the cluster this machine belongs to; anything else is passed to ``ray.init``. When
Ray is already initialised in this process, the job uses that connection.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from rlm.cache import Cache, SQLiteCache
from rlm.errors import ConfigError
from rlm.jobs.budget import JobBudget
from rlm.jobs.local import DEADLINE_GRACE_S
from rlm.jobs.output import error_record
from rlm.jobs.tasks import Task
from rlm.usage import BudgetLedger

__all__ = ["run_tasks_on_ray", "worker_name_prefix"]

Finished = Callable[[dict[str, Any]], None]
_JOB_IDS = itertools.count()


def worker_name_prefix(job_tag: str) -> str:
    """Workers of one job are named actors ``<prefix><n>`` (tests find them by it)."""
    return f"rlm-job-{job_tag}-worker-"


def _actor_classes() -> tuple[Any, Any]:
    import ray

    @ray.remote(num_cpus=0)
    class JobLedger:
        """The job's budget, shared by every worker of the job."""

        def __init__(self, max_cost_usd: float | None, max_tokens: int | None,
                     max_time_s: float | None) -> None:
            self.budget = JobBudget(max_cost_usd, max_tokens, max_time_s)

        def charge(self, cost_usd: float, tokens: int) -> None:
            self.budget.charge(cost_usd, tokens)

        def stop_reason(self) -> str | None:
            return self.budget.stop_reason()

        def interrupt(self) -> None:
            self.budget.interrupt()

    @ray.remote(num_cpus=1, max_restarts=0)
    class JobWorker:
        """One worker process of a job: one RLM, many concurrent tasks."""

        def __init__(self, rlm_class: type, settings: dict[str, Any], ledger: Any,
                     concurrency: int, schema: Any, max_time_s: float | None,
                     time_left_s: float | None) -> None:
            # The driver's RLM class travels by reference (Ray pickles an importable class
            # by its module and name), so this module never imports the facade that
            # offers jobs, and a subclass of RLM stays that subclass on the workers.
            self.rlm = rlm_class(**settings)
            self.ledger = ledger
            # The job's deadline, binding every call of this worker's runs.
            self.deadline: BudgetLedger | None = None
            if max_time_s is not None and time_left_s is not None:
                self.deadline = BudgetLedger(max_time_s=max_time_s, name="job")
                # The job started earlier, on the driver: what is left of it is what binds.
                self.deadline.deadline = time.monotonic() + time_left_s
            self.concurrency = max(1, concurrency)
            self.rlm.size_clients(self.concurrency)
            self.gate = asyncio.Semaphore(self.concurrency)
            self.schema = schema

        def ready(self) -> bool:
            return True

        async def run_chunk(self, tasks: list[Task]) -> Any:
            from rlm.jobs.local import run_one

            async def one(task: Task) -> dict[str, Any] | None:
                # The driver keeps two chunks in flight per worker: one gate for both
                # keeps the worker at its share of the job's concurrency.
                async with self.gate:
                    if await self.ledger.stop_reason.remote() is not None:
                        return None  # a job cap was reached: the task is left to a re-run
                    left = self.deadline.remaining_s() if self.deadline is not None else None
                    if left is not None and left <= 0:
                        # Past the job's deadline a task that has not started is left to
                        # a re-run too, as on the local backend, not begun only to stop.
                        return None
                    return await run_one(self.rlm, task, self.concurrency, self.schema,
                                         self.deadline)

            running = {asyncio.ensure_future(one(task)) for task in tasks}
            try:
                while running:
                    done, running = await asyncio.wait(running,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for finished in done:
                        record = finished.result()
                        if record is None:
                            continue
                        self.ledger.charge.remote(float(record.get("cost_usd") or 0.0),
                                                  int(record.get("tokens") or 0))
                        yield record
            finally:
                for task in running:
                    task.cancel()

    return JobLedger, JobWorker


def _portable_settings(rlm: Any) -> dict[str, Any]:
    """``rlm.settings()`` with the cache as a path, which every worker can open."""
    settings = rlm.settings()
    cache = settings.get("cache")
    if isinstance(cache, SQLiteCache):
        settings["cache"] = str(cache.directory)
    elif isinstance(cache, Cache):
        raise ConfigError(
            f"the Ray backend cannot send the cache object {cache!r} to its workers; "
            "pass cache= a directory (or True) instead"
        )
    return settings


def _load(task: Task) -> Task:
    """The task with its context read, ready to travel to a worker."""
    return Task(task.id, task.query, context=task.load_context())


async def run_tasks_on_ray(
    rlm: Any,
    tasks: list[Task],
    finished: Finished,
    budget: JobBudget,
    *,
    concurrency: int,
    address: str | None = None,
    chunk_size: int = 16,
    workers: int | None = None,
    job_tag: str | None = None,
    schema: Any = None,
) -> str | None:
    """Run ``tasks`` on Ray; ``finished(record)`` for each as it ends (see the module doc).

    Returns None when every task ran, or the job cap that stopped new tasks.
    """
    try:
        import ray
        from ray.exceptions import RayActorError
    except ImportError as exc:
        raise ConfigError(
            f"the Ray backend needs ray ({exc}); install it with pip install 'rlm-sandbox[ray]'"
        ) from exc
    settings = _portable_settings(rlm)
    started_here = False
    if not ray.is_initialized():
        await asyncio.to_thread(ray.init, address=address, include_dashboard=False,
                                log_to_driver=False)
        started_here = True
    tag = job_tag or f"{uuid.uuid4().hex[:8]}-{next(_JOB_IDS)}"
    prefix = worker_name_prefix(tag)
    n_workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_workers = min(n_workers, max(1, math.ceil(len(tasks) / max(1, chunk_size))))
    per_worker = max(1, math.ceil(concurrency / n_workers))
    chunk = max(chunk_size, per_worker)
    ledger_cls, worker_cls = _actor_classes()
    ledger = ledger_cls.remote(budget.max_cost_usd, budget.max_tokens, budget.remaining_time())
    queue: collections.deque[list[Task]] = collections.deque(
        tasks[i:i + chunk] for i in range(0, len(tasks), chunk)
    )
    names = itertools.count()
    actors: list[Any] = []

    def new_worker() -> Any:
        actor = worker_cls.options(name=f"{prefix}{next(names)}", namespace="rlm").remote(
            type(rlm), settings, ledger, per_worker, schema, budget.max_time_s,
            budget.remaining_time())
        actors.append(actor)
        return actor

    stop: list[str] = []

    slots: list[Any] = []

    async def drive(slot: int) -> None:
        while queue:
            worker = slots[slot]
            reason = budget.stop_reason()
            if reason is not None:
                stop.append(reason)
                return
            batch = queue.popleft()
            loaded: list[Task] = []
            for task in batch:
                try:
                    loaded.append(await asyncio.to_thread(_load, task))
                except Exception as exc:  # noqa: BLE001 - a task's bad input is its own failure
                    finished(error_record(task.id, f"context: {exc}"))
            reported: set[str] = set()
            try:
                stream = worker.run_chunk.options(num_returns="streaming").remote(loaded)
                del loaded
                async for ref in stream:
                    record = await ref
                    reported.add(str(record["id"]))
                    finished(record)
            except RayActorError:
                # The worker died: what it had not reported runs again on a fresh one.
                left = [t for t in batch if t.key not in reported]
                if left:
                    queue.appendleft(left)
                if slots[slot] is worker:  # the slot's other driver may have replaced it
                    slots[slot] = new_worker()

    drivers: list[asyncio.Task[None]] = []
    try:
        slots.extend(new_worker() for _ in range(n_workers))
        # Two chunks per worker in flight: one runs while the next one's contexts load.
        drivers = [asyncio.ensure_future(drive(i)) for i in range(n_workers) for _ in range(2)]
        # Past the deadline, running tasks stop by themselves (see JobWorker); the grace
        # lets their lines come back before anything left is cancelled.
        left = budget.remaining_time()
        done, pending = await asyncio.wait(
            drivers, timeout=None if left is None else left + DEADLINE_GRACE_S
        )
        if pending:
            stop.append(budget.stop_reason() or f"job max_time_s={budget.max_time_s:g} reached")
            budget.interrupt()
        for task in done:
            task.result()
        reason = await ledger.stop_reason.remote()
        if reason is not None and queue:
            stop.append(reason)
    except asyncio.CancelledError:
        budget.interrupt()
        raise
    finally:
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        for actor in actors:
            ray.kill(actor)
        ray.kill(ledger)
        if started_here:
            await asyncio.to_thread(ray.shutdown)
    return stop[0] if stop else None
