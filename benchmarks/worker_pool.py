"""What a warm worker saves: one process-sandbox REPL's whole life, pooled vs fresh.

Each step makes a REPL over a 20,000-line context, runs two cells (the shape of the
many-task benchmark's task, without the model) and closes it, one after another.
"fresh" starts a new worker every time (two forks of the template, namespaces, a
tmpfs, a uid); "pooled" borrows the previous REPL's worker from a ``WorkerPool`` after
its reset. Also times ``--parallel`` fresh starts at once (the first wave of a job,
when the pool is still empty). Reports medians of ``--runs``; the machine may be
shared.

    python benchmarks/worker_pool.py [--steps 100] [--runs 3] [--parallel 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

CELLS = ("answers = [context[:12], str(len(context))]\nprint(answers)", "FINAL(answers[1])")


def context() -> str:
    return "".join(f"01 line {i:06d}: some log text of moderate length\n" for i in range(20_000))


def lifecycle(ctx: str, pool: Any) -> None:
    from rlm.sandbox.process import ProcessExecutor

    ex = ProcessExecutor(context=ctx, worker_pool=pool)
    ex.start()
    for cell in CELLS:
        out = ex.execute(cell, 10)
        if out.error:
            raise RuntimeError(out.error)
    ex.close()


def sequential(kind: str, steps: int) -> dict[str, float]:
    """ms per REPL (wall) and this process's CPU per REPL, for ``steps`` in a row."""
    from rlm.sandbox.worker_pool import WorkerPool

    ctx = context()
    pool = WorkerPool(max_uses=10**9) if kind == "pooled" else None
    lifecycle(ctx, pool)  # the template process and the first worker
    if pool is not None:
        wait_idle(pool)
    t0, c0 = time.perf_counter(), os.times()
    for _ in range(steps):
        lifecycle(ctx, pool)
        if pool is not None:
            wait_idle(pool)  # the reset runs after close(); the next REPL wants it back
    t1, c1 = time.perf_counter(), os.times()
    if pool is not None:
        pool.close()
    return {
        "ms_per_repl": (t1 - t0) / steps * 1e3,
        "host_cpu_ms_per_repl": (c1.user + c1.system - c0.user - c0.system) / steps * 1e3,
    }


def wait_idle(pool: Any) -> None:
    deadline = time.monotonic() + 10
    while pool.stats()["idle"] == 0 and time.monotonic() < deadline:
        time.sleep(0.0005)


def parallel_starts(n: int) -> float:
    """Seconds until ``n`` fresh workers, started at once, are all ready."""
    from rlm.sandbox.process import ProcessExecutor

    ctx = context()
    executors = [ProcessExecutor(context=ctx) for _ in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as threads:
        list(threads.map(lambda e: e.start(), executors))
    took = time.perf_counter() - t0
    with ThreadPoolExecutor(32) as threads:
        list(threads.map(lambda e: e.close(), executors))
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=200)
    args = parser.parse_args()
    from rlm.sandbox.process import ProcessExecutor

    ProcessExecutor(context="warm-up").start()
    info = machine_info()
    rows: dict[str, Any] = {}
    for kind in ("fresh", "pooled"):
        runs = [sequential(kind, args.steps) for _ in range(args.runs)]
        rows[kind] = {
            "runs": runs,
            "median_ms_per_repl": statistics.median(r["ms_per_repl"] for r in runs),
            "median_host_cpu_ms_per_repl": statistics.median(r["host_cpu_ms_per_repl"] for r in runs),
        }
    starts = [parallel_starts(args.parallel) for _ in range(args.runs)]
    rows["parallel_fresh_starts_s"] = {"runs": starts, "median": statistics.median(starts)}
    print(f"\nworker pool: one REPL's life (start, 2 cells, close) over a 20,000-line context, "
          f"{args.steps} in a row, median of {args.runs}; load at start {info.get('loadavg_at_start')}")
    for kind in ("fresh", "pooled"):
        row = rows[kind]
        print(f"  {kind:7s} {row['median_ms_per_repl']:6.2f} ms per REPL "
              f"(host CPU {row['median_host_cpu_ms_per_repl']:.2f} ms)")
    ratio = rows["fresh"]["median_ms_per_repl"] / rows["pooled"]["median_ms_per_repl"]
    print(f"  pooled is {ratio:.1f}x faster per REPL")
    print(f"  {args.parallel} fresh workers started at once: {statistics.median(starts):.2f} s")
    write_json("worker_pool.json", {"machine": info, "params": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
