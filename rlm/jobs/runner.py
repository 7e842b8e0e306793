"""Running a job: resume from the output, run what is left on a backend, summarise.

The runner owns everything that must behave the same whatever runs the tasks: which
tasks are left (the output file is the record of what finished), the single writer of
the output, the job ledger, progress and the summary. Backends only run tasks and
report each finished one (``rlm.jobs.local`` here, ``rlm.jobs.ray_backend`` on Ray).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm import loop as engine
from rlm.batchapi.settings import BatchSettings
from rlm.errors import ConfigError, LoopError, OutputFileError
from rlm.jobs import output
from rlm.jobs import tasks as inputs
from rlm.jobs.budget import JobBudget
from rlm.jobs.progress import JobProgress
from rlm.jobs.tasks import Task

__all__ = ["JobSummary", "JobTasks", "load_tasks", "run_job", "arun_job"]

BACKENDS = ("local", "ray")
# What a job's tasks may be given as: a JSONL or CSV file, a directory of documents, or
# the tasks themselves (Task objects or mappings with the JSONL keys).
JobTasks = str | os.PathLike[str] | Iterable[Task | Mapping[str, Any]]


@dataclass
class JobSummary:
    """What a job did: counts, spend, time, and why it stopped early (if it did).

    ``total`` tasks in the input, ``skipped`` already in the output before this run
    (``skipped_failed`` of them with an error), ``done``/``failed`` finished by this run, ``not_run`` left for a re-run (a job cap
    stopped new tasks, or the job was interrupted). ``stopped`` says which cap or
    "interrupted"; None when the job ran to the end. ``exit_code`` is the command's.
    """

    out: str
    total: int
    skipped: int = 0
    skipped_failed: int = 0
    done: int = 0
    failed: int = 0
    not_run: int = 0
    cost_usd: float = 0.0
    tokens: int = 0
    elapsed_s: float = 0.0
    stopped: str | None = None
    interrupted: bool = False
    batch: dict[str, Any] | None = None
    # This run's tasks: prompt tokens, those read from the provider's prompt cache, and
    # what Batch APIs took off list price.
    prompt_tokens: int = 0
    cached_input_tokens: int = 0
    batch_saved_usd: float = 0.0

    def count_usage(self, usage: Any) -> None:
        """Add a finished task's ``usage`` (its record's ``root`` and ``sub`` dicts) to
        the prompt-cache and Batch API totals."""
        if not isinstance(usage, Mapping):
            return
        for part in usage.values():
            if isinstance(part, Mapping):
                self.prompt_tokens += int(part.get("prompt_tokens") or 0)
                self.cached_input_tokens += int(part.get("cached_input_tokens") or 0)
                self.batch_saved_usd += float(part.get("batch_saved_usd") or 0.0)

    @property
    def ok(self) -> bool:
        """True when every task of the input has finished without error."""
        return (self.failed == 0 and self.skipped_failed == 0 and self.not_run == 0
                and not self.interrupted)

    @property
    def exit_code(self) -> int:
        """0 all tasks succeeded, 1 some failed or were not run, 130 interrupted."""
        if self.interrupted:
            return 130
        return 0 if self.ok else 1

    def line(self) -> str:
        """The one-line summary printed at the end of a job."""
        rate = (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0
        text = (
            f"rlm batch: {self.done} done, {self.failed} failed, {self.skipped} already done"
            f"{f' ({self.skipped_failed} with errors: --retry-failed runs them again)' if self.skipped_failed else ''}, "
            f"{self.not_run} not run of {self.total}; ${self.cost_usd:.4f}, {self.tokens:,} tokens, "
            f"{self._cached_text()}{self.elapsed_s:.1f} s ({rate:.1f} tasks/s) -> {self.out}"
        )
        if self.batch is not None:
            b = self.batch
            text += (f"; Batch API: {b.get('batches', 0)} batches, {b.get('lines', 0):,} lines "
                     f"({b.get('retried', 0):,} retried), {b.get('live', 0):,} calls sent live")
            if b.get("live_tasks"):
                text += f", {b['live_tasks']} tasks finished live"
            if b.get("resumed"):
                text += f", {b['resumed']} batches resumed"
            if self.batch_saved_usd:
                text += f", saved ${self.batch_saved_usd:.4f} off list price"
        if self.stopped:
            # Tasks a job cap cut short have a line ("budget"): only --retry-failed redoes them.
            again = " (and --retry-failed for the tasks that failed)" if self.failed else ""
            text += f"; stopped: {self.stopped} (re-run the same command to continue{again})"
        return text

    def _cached_text(self) -> str:
        if not self.cached_input_tokens or not self.prompt_tokens:
            return ""
        return f"{self.cached_input_tokens / self.prompt_tokens:.0%} of input cached, "


def load_tasks(
    source: JobTasks,
    *,
    query: str | None = None,
    fmt: str = "auto",
    encoding: str = "utf-8",
) -> list[Task]:
    """The tasks of a job from a JSONL or CSV file, a directory (one task per file, with
    ``query``), or an iterable of ``Task`` objects or mappings with the JSONL keys."""
    if fmt not in inputs.FORMATS:
        raise ConfigError(f"fmt must be one of {', '.join(inputs.FORMATS)}, got {fmt!r}")
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            if query is None:
                raise ConfigError("a directory of documents needs a query for all of them (--query)")
            return inputs.read_dir(path, query, fmt=fmt, encoding=encoding)
        if path.suffix.lower() == ".csv":
            return inputs.read_csv(path, query=query, fmt=fmt, encoding=encoding)
        return inputs.read_jsonl(path, query=query, fmt=fmt, encoding=encoding)
    return inputs.tasks_from(source, query=query, fmt=fmt, encoding=encoding)


def run_job(
    rlm: Any,
    tasks: JobTasks,
    out: str | os.PathLike[str],
    *,
    query: str | None = None,
    fmt: str = "auto",
    encoding: str = "utf-8",
    concurrency: int = 8,
    max_cost_usd: float | None = None,
    max_tokens: int | None = None,
    max_time_s: float | None = None,
    retry_failed: bool = False,
    sort_output: bool = False,
    progress: bool = True,
    backend: str = "local",
    ray_address: str | None = None,
    ray_chunk_size: int = 16,
    ray_workers: int | None = None,
    schema: Any = None,
    batch_api: bool | BatchSettings = False,
) -> JobSummary:
    """Sync form of ``arun_job`` (blocks; Ctrl-C stops the job with its output valid).

    With the in-process sandbox the job runs on the engine loop itself, where the model
    calls run, so no call hops between threads. With the process sandbox it runs on a
    loop of its own on a helper thread, as an async caller would: starting a worker
    waits on the engine loop from a pool thread, and 200 tasks doing that from the
    engine loop's own pool would exhaust it and deadlock.
    """
    if engine.in_engine_thread():
        raise LoopError(
            "RLM.run_job was called on rlm's engine loop thread, where it would deadlock; "
            "use `await rlm.arun_job(...)` there"
        )
    finished = threading.Event()

    async def job() -> JobSummary:
        try:
            return await arun_job(
                rlm, tasks, out, query=query, fmt=fmt, encoding=encoding,
                concurrency=concurrency, max_cost_usd=max_cost_usd, max_tokens=max_tokens,
                max_time_s=max_time_s, retry_failed=retry_failed, sort_output=sort_output,
                progress=progress, backend=backend, ray_address=ray_address,
                ray_chunk_size=ray_chunk_size, ray_workers=ray_workers, schema=schema,
                batch_api=batch_api,
            )
        finally:
            finished.set()

    own_loop: asyncio.AbstractEventLoop | None = None
    if getattr(rlm, "sandbox", None) == "local" and backend == "local":
        loop = engine.engine_loop()
    else:
        loop = own_loop = asyncio.new_event_loop()
        threading.Thread(target=_serve_loop, args=(loop,), name="rlm-job", daemon=True).start()
    future = asyncio.run_coroutine_threadsafe(job(), loop)
    try:
        while not finished.wait(0.2):  # short waits keep Ctrl-C and SIGTERM handlers responsive
            pass
        return future.result()
    except BaseException:
        # Interrupted: cancel the job and wait for it to write what finished and stop.
        future.cancel()
        finished.wait(60)
        raise
    finally:
        if own_loop is not None:
            own_loop.call_soon_threadsafe(own_loop.stop)


def _batch_settings(batch_api: Any, backend: str) -> BatchSettings | None:
    """The batch-mode settings ``batch_api`` asks for (None: the live API)."""
    if batch_api is False or batch_api is None:
        return None
    if backend != "local":
        raise ConfigError("batch_api runs on the local backend; leave out backend='ray'")
    if batch_api is True:
        return BatchSettings()
    if isinstance(batch_api, BatchSettings):
        return batch_api
    raise ConfigError(
        f"batch_api must be True, False or an rlm.batchapi.BatchSettings, not {batch_api!r}")


def _serve_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def arun_job(
    rlm: Any,
    tasks: JobTasks,
    out: str | os.PathLike[str],
    *,
    query: str | None = None,
    fmt: str = "auto",
    encoding: str = "utf-8",
    concurrency: int = 8,
    max_cost_usd: float | None = None,
    max_tokens: int | None = None,
    max_time_s: float | None = None,
    retry_failed: bool = False,
    sort_output: bool = False,
    progress: bool = True,
    backend: str = "local",
    ray_address: str | None = None,
    ray_chunk_size: int = 16,
    ray_workers: int | None = None,
    schema: Any = None,
    batch_api: bool | BatchSettings = False,
) -> JobSummary:
    """Run every task not yet in ``out`` and append one line per finished task to it.

    See ``RLM.run_job`` for the options; this is the same job with the RLM passed in.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
    for name, cap in (("max_cost_usd", max_cost_usd), ("max_tokens", max_tokens),
                      ("max_time_s", max_time_s)):
        if cap is not None and cap <= 0:
            raise ConfigError(f"{name} must be positive, got {cap!r}")
    if schema is not None:
        from rlm.schema import Schema

        Schema.of(schema)  # a broken schema is one ConfigError now, not one per task
    settings = _batch_settings(batch_api, backend)
    task_list = (
        tasks if isinstance(tasks, list) and all(isinstance(t, Task) for t in tasks)
        else await asyncio.to_thread(load_tasks, tasks, query=query, fmt=fmt, encoding=encoding)
    )
    inputs.check_unique(task_list, "the tasks")
    out_path = Path(out)
    existing = await asyncio.to_thread(output.read_results, out_path)
    if retry_failed:
        keys = {t.key for t in task_list}
        failed = {key for key, record in existing.items() if key in keys and output.is_failed(record)}
        if failed:
            await asyncio.to_thread(output.drop_ids, out_path, failed)
            for key in failed:
                del existing[key]
    todo = [t for t in task_list if t.key not in existing]
    summary = JobSummary(out=str(out_path), total=len(task_list), skipped=len(task_list) - len(todo))
    keys = {t.key for t in task_list}
    summary.skipped_failed = sum(
        1 for key, record in existing.items() if key in keys and output.is_failed(record)
    )
    budget = JobBudget(max_cost_usd, max_tokens, max_time_s)
    bar = JobProgress(len(todo), skipped=summary.skipped, enabled=progress)
    started = time.monotonic()

    def durable(record: dict[str, Any]) -> None:
        # Runs on the writer thread once the line is on disk: only now is the task done.
        ok = not output.is_failed(record)
        bar.advance(ok, float(record.get("cost_usd") or 0.0))

    writer = output.ResultsWriter(out_path, on_durable=durable)
    finished_ids: set[str] = set()

    def finished(record: dict[str, Any]) -> None:
        if budget.interrupted:
            # A run that ends while the job is being stopped may have been cut short by
            # the stop itself: leave it to the re-run rather than record a false failure.
            return
        key = str(record["id"])
        if key in finished_ids:
            return  # a re-queued task that had finished after all: keep one line
        finished_ids.add(key)
        budget.charge(float(record.get("cost_usd") or 0.0), int(record.get("tokens") or 0))
        summary.count_usage(record.get("usage"))
        writer.write(record)
        if output.is_failed(record):
            summary.failed += 1
        else:
            summary.done += 1

    runner = None
    try:
        if settings is not None:
            from rlm.jobs.batch import BatchRunner

            state_dir = settings.state_dir or str(out_path) + ".batch"
            runner = BatchRunner(rlm, settings, state_dir, budget, concurrency, schema, bar)
            summary.stopped = await runner.run(todo, finished)
        elif backend == "local":
            from rlm.jobs.local import run_tasks

            rlm.size_clients(concurrency)
            summary.stopped = await run_tasks(rlm, iter(todo), finished, budget, concurrency,
                                              schema)
        else:
            try:
                from rlm.jobs.ray_backend import run_tasks_on_ray
            except ImportError as exc:
                raise ConfigError(
                    f"the Ray backend is not available ({exc}); install it with "
                    "pip install 'rlm-sandbox[ray]', or use backend='local'"
                ) from exc

            summary.stopped = await run_tasks_on_ray(
                rlm, todo, finished, budget, concurrency=concurrency, address=ray_address,
                chunk_size=ray_chunk_size, workers=ray_workers, schema=schema,
            )
    except asyncio.CancelledError:
        budget.interrupt()
        summary.interrupted = True
        summary.stopped = "interrupted"
        raise
    finally:
        await asyncio.to_thread(writer.close)
        bar.close()
        spent = budget.snapshot()
        summary.cost_usd, summary.tokens = spent["cost_usd"], spent["tokens"]
        if runner is not None:
            summary.batch = runner.counts()
        summary.not_run = len(todo) - summary.done - summary.failed
        summary.elapsed_s = time.monotonic() - started
        if progress:
            print(summary.line(), file=sys.stderr, flush=True)
    if writer.error is not None:
        raise OutputFileError(f"writing {out_path} failed: {writer.error}")
    if sort_output:
        await asyncio.to_thread(output.rewrite_sorted, out_path, [t.key for t in task_list])
    return summary
