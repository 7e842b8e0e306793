"""Running a benchmark: every (task, length, seed, method) cell once, resumably, under a cost cap.

This module holds the plan (which cells), the tasks file the cells read their contexts
from, turning each finished cell into a scored line, and re-scoring. Running is the
job machinery of ``rlm batch``: ``rlm.jobs.local.run_tasks`` runs the cells a few at a
time (a cell's ``Task`` carries the cell itself as its context, and ``_CellRunner``
answers it with the cell's method), the results file is ``rlm.jobs.output``'s (one
fsynced line per finished cell, a torn last line dropped, resumed by id), and the
cost cap is ``rlm.jobs.budget.JobBudget`` (bound per model call for the ``rlm`` and
``direct`` methods). It must not hold how a method answers
(``rlm.bench.methods``), how answers are graded (``rlm.bench.scorers``) or how the
results are shown (``rlm.bench.report``).

Files in the output directory: ``tasks.jsonl`` (the generated tasks, in the format
``rlm batch`` reads), ``results.jsonl`` (one line per cell), ``summary.json`` and
``report.html``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlm.bench import methods as bench_methods
from rlm.bench import report
from rlm.bench.generators import FAMILIES, generate, parse_length
from rlm.bench.scorers import score
from rlm.errors import ConfigError, OutputFileError
from rlm.jobs import output
from rlm.jobs.budget import JobBudget
from rlm.jobs.local import run_tasks
from rlm.jobs.runner import JobSummary
from rlm.jobs.tasks import Task

__all__ = ["BenchPlan", "BenchSummary", "arun_bench", "rescore", "write_reports"]

TASKS_FILE = "tasks.jsonl"
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class BenchPlan:
    """Which cells a benchmark runs: every task family at every length, ``n`` seeds, each method.

    ``lengths`` are spelled as ``parse_length`` reads them (``8k``, ``1m``). Task ``i``
    of a family uses generator seed ``seed`` and index ``i``, so two plans with the
    same ``seed`` share their first tasks.
    """

    tasks: tuple[str, ...]
    lengths: tuple[str, ...]
    n: int = 5
    seed: int = 0
    methods: tuple[str, ...] = ("rlm", "direct")

    def check(self) -> None:
        """Raise ``ConfigError`` for an unknown task or method, a bad length or ``n``."""
        for name, given, known in (("task", self.tasks, FAMILIES),
                                   ("method", self.methods, bench_methods.METHODS)):
            if not given:
                raise ConfigError(f"give at least one {name}: {', '.join(known)}")
            unknown = [x for x in given if x not in known]
            if unknown:
                raise ConfigError(f"unknown {name} {unknown[0]!r}; choose from {', '.join(known)}")
        if not self.lengths:
            raise ConfigError("give at least one length, e.g. 8k,32k")
        for length in self.lengths:
            parse_length(length)
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"n must be a whole number >= 1, got {self.n!r}")

    def token_lengths(self) -> list[int]:
        """The lengths in tokens, ascending and without repeats."""
        return sorted({parse_length(x) for x in self.lengths})


@dataclass
class BenchSummary(JobSummary):
    """What a ``rlm bench run`` did, counted in cells as ``JobSummary`` counts tasks.

    ``total`` cells in the plan, ``skipped`` already in the results, ``done`` run now
    (``failed`` of them ended with an error other than "over window": their line is
    written, ``retry_failed`` runs them again), ``not_run`` left for a re-run (the cost
    cap stopped new cells, or the run was interrupted; ``stopped`` says why).
    ``skipped_methods`` maps a method that could not run to the reason.
    """

    skipped_methods: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        text = (f"rlm bench: {self.done + self.failed} cells run ({self.failed} with errors), "
                f"{self.skipped} already done, {self.not_run} not run of {self.total}; "
                f"${self.cost_usd:.4f}, {self.elapsed_s:.1f} s -> {self.out}")
        if self.stopped:
            text += f"; stopped: {self.stopped} (re-run the same command to continue)"
        return text


@dataclass(frozen=True)
class _Cell:
    """One (task, method) to run: the task's line in the tasks file, its metadata."""

    task: Task
    meta: Mapping[str, Any]
    method: str

    @property
    def id(self) -> str:
        return f"{self.task.id}/{self.method}"


class _CellRunner:
    """What ``run_tasks`` runs each task on: answers a cell with the cell's method.

    ``run_tasks`` hands a task's context to ``acompletion`` inside the job ledger's
    ``spending_from`` block; a cell's task carries the cell as its context, and the
    real context is read from the tasks file here, when the cell starts.
    """

    def __init__(self, rlm: Any, window: int, rlms_python: str | None,
                 settings: dict[str, Any]) -> None:
        self.rlm = rlm
        self.window = window
        self.rlms_python = rlms_python
        self.settings = settings

    async def acompletion(self, context: _Cell, query: str, schema: Any = None) -> Any:
        cell = context
        if cell.method == "rlms":
            assert self.rlms_python is not None
            return await bench_methods.run_rlms(self.rlms_python, cell.task, self.settings,
                                                self.rlm.client.price)
        text = await asyncio.to_thread(cell.task.load_context)
        if cell.method == "direct":
            return await bench_methods.run_direct(self.rlm.client, text, query, self.window)
        return await self.rlm.acompletion(context=text, query=query)


def _write_tasks(plan: BenchPlan, directory: Path) -> list[tuple[Task, dict[str, Any]]]:
    """Generate the plan's tasks into ``tasks.jsonl`` (atomically) and return each task
    with its metadata; a task's context stays on disk until its cell reads it."""
    path = directory / TASKS_FILE
    tmp = path.with_name(path.name + ".tmp")
    out: list[tuple[Task, dict[str, Any]]] = []
    offset = 0
    with tmp.open("wb") as fh:
        for tokens in plan.token_lengths():
            for family in plan.tasks:
                for t in generate(family, tokens, plan.n, plan.seed):
                    line = (json.dumps(t.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
                    fh.write(line)
                    task = Task(t.id, t.query, line_ref=(str(path.resolve()), offset))
                    offset += len(line)
                    out.append((task, {"task": t.task, "length": t.length, "length_tokens": tokens,
                                       "seed": t.seed, "expected": t.expected}))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return out


def _cells(tasks: Sequence[tuple[Task, dict[str, Any]]], methods: Sequence[str],
           done: set[str]) -> list[_Cell]:
    # For each task every method in turn, so a cost cap that stops the run early leaves
    # the methods compared on the same tasks.
    cells = []
    for task, meta in tasks:
        for method in methods:
            cell = _Cell(task, meta, method)
            if cell.id not in done:
                cells.append(cell)
    return cells


def _job_task(cell: _Cell) -> Task:
    return Task(cell.id, cell.task.query, context=cell)


def _record(cell: _Cell, done: Mapping[str, Any]) -> dict[str, Any]:
    """The results line of a cell from the job's record of it (``result_record``)."""
    meta = cell.meta
    answer = done.get("answer")
    stopped = done.get("stopped_reason")
    return {
        "id": cell.id, "task_id": cell.task.id, "task": meta["task"], "length": meta["length"],
        "length_tokens": meta["length_tokens"], "seed": meta["seed"], "method": cell.method,
        "expected": meta["expected"], "answer": answer,
        "score": score(meta["task"], meta["expected"], answer),
        "cost_usd": float(done.get("cost_usd") or 0.0), "tokens": int(done.get("tokens") or 0),
        "wall_s": round(float(done.get("elapsed_s") or 0.0), 3), "error": done.get("error"),
        "over_window": stopped == "over_window", "stopped_reason": stopped,
        "iterations": int(done.get("iterations") or 0),
        "sub_calls": int(done.get("sub_calls") or 0),
    }


def _prepare(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory; --out wants a directory")
    directory.mkdir(parents=True, exist_ok=True)


def _failed(record: Mapping[str, Any]) -> bool:
    return bool(record.get("error")) and not record.get("over_window")


async def arun_bench(
    rlm: Any,
    plan: BenchPlan,
    out_dir: str | os.PathLike[str],
    *,
    concurrency: int = 4,
    max_cost_usd: float | None = None,
    max_time_s: float | None = None,
    window: int | None = None,
    rlms_python: str | None = None,
    api_key: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> BenchSummary:
    """Run every cell of ``plan`` not yet in ``out_dir``'s results, then write the reports.

    ``rlm`` (an ``RLM``) answers the ``rlm`` cells; its root client, with the root
    model, makes the ``direct`` calls, refused past ``window`` tokens (default: the
    model's known window, else 128k); ``rlms`` cells run the official package with
    ``rlms_python`` and ``api_key`` (default $OPENAI_API_KEY), skipped with one line
    on stderr when the package is not there. The job stops starting cells once
    ``max_cost_usd`` is spent (or ``max_time_s`` has passed), and running cells stop
    at their next model call; cells cut short that way are not recorded, so
    re-running the same command carries on where it stopped.
    """
    plan.check()
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
    for name, cap in (("max_cost_usd", max_cost_usd), ("max_time_s", max_time_s)):
        if cap is not None and cap <= 0:
            raise ConfigError(f"{name} must be positive, got {cap!r}")
    directory = Path(out_dir)
    await asyncio.to_thread(_prepare, directory)
    results_path = directory / RESULTS_FILE
    started = time.monotonic()

    methods = list(plan.methods)
    skipped: dict[str, str] = {}
    rlms_exe: str | None = None
    if "rlms" in methods:
        rlms_exe, why = await asyncio.to_thread(bench_methods.find_rlms, rlms_python)
        if rlms_exe is None:
            methods.remove("rlms")
            skipped["rlms"] = why
            print(f"rlm bench: method rlms skipped: {why}", file=sys.stderr, flush=True)
    window = window or bench_methods.window_tokens(rlm.model)

    tasks = await asyncio.to_thread(_write_tasks, plan, directory)
    existing = await asyncio.to_thread(output.read_results, results_path)
    if retry_failed:
        failed = {key for key, r in existing.items() if _failed(r)}
        if failed:
            await asyncio.to_thread(output.drop_ids, results_path, failed)
            existing = {k: r for k, r in existing.items() if k not in failed}
    planned = len(tasks) * len(methods)
    todo = _cells(tasks, methods, set(existing))
    summary = BenchSummary(out=str(directory), total=planned, skipped=planned - len(todo),
                           skipped_methods=skipped)

    budget = JobBudget(max_cost_usd, None, max_time_s)
    from rich.console import Console

    from rlm.display.progress import BatchProgress

    bar = BatchProgress("rlm bench cells", Console(stderr=True)) if progress else None
    if bar is not None:
        bar.start(len(todo))
    settings = {"model": rlm.model, "recursive_model": rlm.recursive_model,
                "base_url": rlm.client.base_url,
                "api_key": api_key or os.environ.get("OPENAI_API_KEY"),
                "max_iterations": rlm.max_iterations}
    runner = _CellRunner(rlm, window, rlms_exe, settings)
    by_id = {cell.id: cell for cell in todo}
    writer = output.ResultsWriter(results_path)

    def finished(done: dict[str, Any]) -> None:
        if budget.interrupted:
            return  # a cell ended by the stop itself: a re-run does it again
        if done.get("stopped_reason") == "budget" and budget.stop_reason() is not None:
            return  # cut short by the job's cap: not a result, a re-run does it again
        record = _record(by_id[str(done["id"])], done)
        budget.charge(record["cost_usd"], record["tokens"])
        writer.write(record)
        if _failed(record):
            summary.failed += 1
        else:
            summary.done += 1
        if bar is not None:
            bar.advance(not _failed(record))

    try:
        summary.stopped = await run_tasks(runner, (_job_task(c) for c in todo), finished,
                                          budget, concurrency)
    except asyncio.CancelledError:
        budget.interrupt()
        summary.interrupted = True
        summary.stopped = "interrupted"
        raise
    finally:
        await asyncio.to_thread(writer.close)
        if bar is not None:
            bar.stop()
        summary.cost_usd = budget.snapshot()["cost_usd"]
        summary.not_run = len(todo) - summary.done - summary.failed
        summary.elapsed_s = time.monotonic() - started
        if progress:
            print(summary.line(), file=sys.stderr, flush=True)
    if writer.error is not None:
        raise OutputFileError(f"writing {results_path} failed: {writer.error}")
    info = {
        **(meta or {}), "model": rlm.model, "recursive_model": rlm.recursive_model,
        "window_tokens": window, "plan": {"tasks": list(plan.tasks), "lengths": list(plan.lengths),
                                          "n": plan.n, "seed": plan.seed,
                                          "methods": list(plan.methods)},
        "skipped_methods": skipped,
    }
    await asyncio.to_thread(write_reports, directory, info)
    return summary


def _read_meta(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k != "rows"} if isinstance(data, dict) else {}


def write_reports(directory: str | os.PathLike[str],
                  meta: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write ``summary.json`` and ``report.html`` from every line of ``results.jsonl``.

    ``meta`` (the models, the plan...) goes into summary.json; without it the meta
    already there is kept. Returns the summary rows.
    """
    path = Path(directory)
    records = list(output.read_results(path / RESULTS_FILE, repair=False).values())
    info = dict(meta) if meta is not None else _read_meta(path)
    info.update(cells=len(records), cost_usd=sum(float(r.get("cost_usd") or 0.0) for r in records),
                updated=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    rows = report.summarize(records)
    report.write_summary(path, rows, info)
    report.write_html(path, rows, info)
    return rows


def rescore(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Grade every line of ``out_dir``'s results.jsonl again with the current scorers,
    rewrite the file (atomically) and the reports, and return the summary rows.

    Raises ``ConfigError`` when the directory has no results.jsonl.
    """
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise ConfigError(f"{out_dir} has no {RESULTS_FILE}; give the --out directory of a "
                          "rlm bench run")
    records = output.read_results(path, repair=False)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records.values():
            record["score"] = score(record["task"], record.get("expected"), record.get("answer"))
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return write_reports(out_dir)
