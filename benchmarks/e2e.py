"""End-to-end: the demo task (needle in 1,000,000 lines) at 0.5 s per model call.

Reports wall time, the number of sub-queries, and the sequential equivalent (their
summed latency), as medians over a few runs. Target: the demo finishes in under 10 s.

    python benchmarks/e2e.py [--runs 3] [--lines 1000000] [--latency 0.5] [--sandbox local]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlm import demo
from rlm.core import RLM

RESULTS_DIR = Path(__file__).parent / "results"


def one_run(haystack: demo.Haystack, latency: float, sandbox: str | None) -> dict[str, float]:
    with demo.demo_server(latency=latency) as server:
        rlm = RLM(model=demo.ROOT_MODEL, recursive_model=demo.SUB_MODEL, base_url=server.url,
                  api_key="bench", max_concurrency=256, sandbox=sandbox)
        start = time.perf_counter()
        result = rlm.completion(context=haystack.text, query=demo.QUERY)
        wall = time.perf_counter() - start
        rlm.close()
        peak = server.peak_in_flight
    outcome = demo.summarize(result, haystack, wall, latency)
    return {
        "wall_s": wall,
        "sub_calls": outcome.sub_calls,
        "sequential_s": outcome.sequential_s,
        "root_calls": result.usage["root"].calls,
        "correct": outcome.correct,
        "peak_in_flight": peak,
        "sandbox": rlm.sandbox,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--sandbox", choices=["local", "process"], default=None)
    parser.add_argument("--quick", action="store_true", help="one run")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    haystack = demo.build_haystack(args.lines)
    rows = [one_run(haystack, args.latency, args.sandbox) for _ in range(runs)]
    wall = statistics.median(r["wall_s"] for r in rows)
    first = rows[0]
    table = Table(title=f"e2e: needle in {args.lines:,} lines, {args.latency:g} s per model call "
                        f"(median of {runs}, sandbox={first['sandbox']})")
    for col in ("wall s", "root calls", "sub-queries", "peak in flight", "sequential equivalent s",
                "speed-up", "correct"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{wall:.2f}", str(first["root_calls"]), str(first["sub_calls"]), str(first["peak_in_flight"]),
        f"{first['sequential_s']:.1f}", f"{first['sequential_s'] / wall:.0f}x",
        "yes" if all(r["correct"] for r in rows) else "NO",
    )
    Console().print(table)
    target = wall < 10.0
    print(f"target: demo under 10 s -> {'met' if target else 'MISSED'} ({wall:.2f} s)")
    results = RESULTS_DIR / f"e2e-{first['sandbox']}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d")},
        "lines": args.lines, "latency_s": args.latency, "runs": rows, "median_wall_s": wall,
        "target_met": target,
    }, indent=2))
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
