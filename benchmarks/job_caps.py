"""Job caps that bind per model call: overshoot with many tasks at once, and overhead.

1. Overshoot: ``--tasks`` tasks run all at once, each a root turn that fans out
   ``--fan-out`` sub-queries and a root turn that answers. The job is run once without
   a cap (its total is T), then with ``max_tokens = T / 2``. Printed: what the capped
   job spent, its overshoot, and the bound the ledger guarantees when every
   reservation covers its call (cap + the largest single reservation: the longest
   prompt / 4 + 1 + 256). Before per-call job caps every task started before any
   finished, so the capped job spent T.
2. Overhead: ``--overhead-tasks`` tasks, ``--concurrency`` at a time, with no job cap
   and with a cap that never binds, median tasks/s of ``--runs`` each. The fake server
   runs in this process on its own thread: both rows pay for it alike, so read the
   ratio, on a machine that may be shared.

    python benchmarks/job_caps.py [--tasks 50] [--fan-out 20] [--overhead-tasks 300]
        [--concurrency 100] [--runs 3] [--sandbox local|process]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

ROOT = "bench-root"
SUB = "bench-sub"
ANSWER = "```repl\nFINAL(context.split()[0].upper())\n```"


def fan_out_code(n: int) -> str:
    return (f"```repl\nparts = llm_query_batch(['ECHO ' + context * 3 + str(i) for i in range({n})])\n"
            "print(len(parts))\n```")


def tasks(n: int) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "query": "What is the first word?", "context": f"word{i} " + "filler " * 20}
            for i in range(n)]


def run_job(url: str, out: Path, n: int, concurrency: int, sandbox: str,
            **caps: Any) -> tuple[Any, list[dict[str, Any]], float]:
    from rlm import RLM

    rlm = RLM(model=ROOT, recursive_model=SUB, base_url=url, api_key="k", sandbox=sandbox)
    try:
        started = time.perf_counter()
        summary = rlm.run_job(tasks(n), out, concurrency=concurrency, progress=False, **caps)
        elapsed = time.perf_counter() - started
    finally:
        rlm.close()
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return summary, records, elapsed


def overshoot(n: int, fan_out: int, sandbox: str, work: Path) -> dict[str, Any]:
    from rlm.testing import FakeLLMServer

    script = [fan_out_code(fan_out), ANSWER]
    with FakeLLMServer(lambda messages: "ok", scripts={ROOT: script}, latency=0.02) as srv:
        _, free, _ = run_job(srv.url, work / "free.jsonl", n, n, sandbox)
        total = sum(r["tokens"] for r in free)
        cap = total // 2
        srv.reset_counters()
        summary, capped, _ = run_job(srv.url, work / "capped.jsonl", n, n, sandbox, max_tokens=cap)
        log = srv.requests_log
        requests = srv.requests
    spent = sum(r["tokens"] for r in capped)
    longest = max(sum(len(m["content"]) for m in entry["messages"]) for entry in log)
    return {
        "tasks_at_once": n, "fan_out": fan_out, "uncapped_tokens": total, "cap": cap,
        "spent": spent, "overshoot": spent - cap, "bound": cap + longest // 4 + 1 + 256,
        "requests": requests, "cut_short": sum(r["stopped_reason"] == "budget" for r in capped),
        "finished": sum(r["stopped_reason"] == "final" for r in capped), "stopped": summary.stopped,
    }


def overhead(n: int, concurrency: int, runs: int, sandbox: str, work: Path) -> dict[str, Any]:
    from rlm.testing import FakeLLMServer

    rates: dict[str, list[float]] = {"no job cap": [], "job cap (never binds)": []}
    with FakeLLMServer(scripts={ROOT: [fan_out_code(2), ANSWER]}, latency=0.05) as srv:
        for i in range(runs):
            for label, caps in (("no job cap", {}),
                                ("job cap (never binds)", {"max_tokens": 10**12})):
                out = work / f"overhead-{i}-{len(caps)}.jsonl"
                summary, _, elapsed = run_job(srv.url, out, n, concurrency, sandbox, **caps)
                assert summary.exit_code == 0, summary
                rates[label].append(n / elapsed)
    medians = {label: statistics.median(values) for label, values in rates.items()}
    return {"tasks": n, "concurrency": concurrency, "runs": runs, "tasks_per_s": rates,
            "median_tasks_per_s": medians,
            "ratio": medians["job cap (never binds)"] / medians["no job cap"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--fan-out", type=int, default=20)
    parser.add_argument("--overhead-tasks", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sandbox", choices=["local", "process"], default="local")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        over = overshoot(args.tasks, args.fan_out, args.sandbox, work)
        print(f"{over['tasks_at_once']} tasks at once, fan-out {over['fan_out']}: uncapped "
              f"{over['uncapped_tokens']:,} tokens; cap {over['cap']:,} -> spent {over['spent']:,} "
              f"(overshoot {over['overshoot']:,}, bound {over['bound']:,}), {over['requests']} "
              f"requests, {over['finished']} finished, {over['cut_short']} cut short")
        cost = overhead(args.overhead_tasks, args.concurrency, args.runs, args.sandbox, work)
        for label, rate in cost["median_tasks_per_s"].items():
            print(f"{label:>22}: {rate:6.1f} tasks/s (median of {args.runs})")
        print(f"{'ratio':>22}: {cost['ratio']:.3f}")
    path = write_json(f"job_caps-{args.sandbox}.json",
                      {"machine": machine_info(), "sandbox": args.sandbox, "overshoot": over,
                       "overhead": cost})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
