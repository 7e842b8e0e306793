"""Batch mode at scale: 2,000 tasks waiting on provider batches, process sandbox.

Each task is 2 root turns and a wave of 2 sub-queries (3 steps: root turn 1, the
sub-query batch, root turn 2), every call through the fake server's OpenAI Batch API
with a fixed turnaround (5 s by default), the fake in its own process. Waiting tasks
park and are replayed (rlm.batchapi.replay), so the host should hold at most
``concurrency`` sandbox workers whatever the number of waiting tasks. Reports the
host process's peak RSS and the peak PSS of its whole process tree (sampled every
0.5 s, with its number of processes), the
wall time against steps x turnaround, tries, batches, lines and live requests.
Targets: peak host RSS under 2 GB; wall within 1.5x of steps x turnaround.

    python benchmarks/batch_api.py [--tasks 2000] [--turnaround 5] [--concurrency 64]
        [--sandbox process|local] [--lines 200] [--poll-s 0.5] [--window-s 10] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_result, machine_info, run_worker, server_stats, write_json  # noqa: E402

ROOT_MODEL = "bench-root"
SUB_MODEL = "bench-sub"
STEPS = 3
TURN_1 = (
    "Two sub-questions.\n```repl\n"
    "parts = llm_query_batch(['ECHO ' + w for w in context.split()[:2]])\nprint(parts)\n```"
)
TURN_2 = "Done.\n```repl\nFINAL('-'.join(parts))\n```"


def serve(turnaround: float) -> None:
    """Run the scripted fake server until killed, printing READY <url> once listening."""
    from rlm.testing import BatchOptions, FakeLLMServer

    async def main() -> None:
        server = FakeLLMServer(scripts={ROOT_MODEL: [TURN_1, TURN_2]},
                               batches=BatchOptions(delay=turnaround))
        await server.astart()
        print(f"READY {server.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _tree_memory(root: int) -> tuple[float, int]:
    """PSS of ``root`` and all its descendants in MB (shared pages split between the
    processes that share them, so forked workers are not counted many times), and how
    many processes that is (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(status.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total_kb, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total_kb += int(line.split()[1])
                break
        todo.extend(children.get(pid, ()))
    return total_kb / 1024, count


def worker(args: argparse.Namespace) -> None:
    """One measured job in a fresh process: run it, check the answers, emit the numbers."""
    from rlm import RLM
    from rlm.batchapi import BatchSettings

    filler = "".join(f"line {i:04d} of some document text\n" for i in range(args.lines))
    tasks = [{"id": f"t{i}", "query": "Join the first two words.",
              "context": f"a{i} b{i}\n{filler}"} for i in range(args.tasks)]
    rlm = RLM(model=ROOT_MODEL, recursive_model=SUB_MODEL, base_url=args.url, api_key="bench",
              sandbox=args.sandbox, max_concurrency=256)
    peak_tree = [0.0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            pss, processes = _tree_memory(os.getpid())
            peak_tree[0] = max(peak_tree[0], pss)
            peak_tree[1] = max(peak_tree[1], processes)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    settings = BatchSettings(poll_min_s=args.poll_s, window_s=args.window_s)
    cpu0 = os.times()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        summary = rlm.run_job(tasks, out, concurrency=args.concurrency, progress=False,
                              batch_api=settings)
        records = [json.loads(x) for x in out.read_text().splitlines()]
    wall = time.perf_counter() - started
    cpu1 = os.times()
    stop.set()
    sampler.join()
    rlm.close()
    correct = sum(1 for r in records if r["answer"] == f"a{r['id'][1:]}-b{r['id'][1:]}")
    emit_result({
        "wall_s": wall,
        "ideal_s": STEPS * args.turnaround,
        "wall_over_ideal": wall / (STEPS * args.turnaround),
        "peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_tree_pss_mb": peak_tree[0],
        "peak_processes": peak_tree[1],
        "user_s": cpu1.user - cpu0.user,
        "sys_s": cpu1.system - cpu0.system,
        "children_cpu_s": (cpu1.children_user - cpu0.children_user)
        + (cpu1.children_system - cpu0.children_system),
        "done": summary.done,
        "failed": summary.failed,
        "correct": correct,
        "batch": summary.batch,
    })


def spawn_server(turnaround: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--turnaround", str(turnaround)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--turnaround", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sandbox", choices=["local", "process"], default="process")
    parser.add_argument("--lines", type=int, default=200, help="filler lines per context")
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results JSON name (default batch_api-<sandbox>.json)")
    args = parser.parse_args()
    if args.serve:
        serve(args.turnaround)
        return 0
    if args.worker:
        worker(args)
        return 0
    info = machine_info()
    runs = []
    for _ in range(args.runs):
        server, url = spawn_server(args.turnaround)
        try:
            cmd = [sys.executable, __file__, "--worker", "--url", url, "--sandbox", args.sandbox,
                   "--tasks", str(args.tasks), "--concurrency", str(args.concurrency),
                   "--turnaround", str(args.turnaround), "--lines", str(args.lines),
                   "--poll-s", str(args.poll_s), "--window-s", str(args.window_s)]
            result = run_worker(cmd, timeout=3600)
            stats = server_stats(url)
            result["server"] = {k: stats.get(k) for k in ("requests", "batch_lines",
                                                         "batches_created")}
        finally:
            server.kill()
            server.wait()
        runs.append(result)
        print(json.dumps(result), flush=True)
    good = [r for r in runs if "wall_s" in r]

    def med(key: str) -> float | None:
        return statistics.median(r[key] for r in good) if good else None

    wall, rss, tree = med("wall_s"), med("peak_host_rss_mb"), med("peak_tree_pss_mb")
    ideal = STEPS * args.turnaround
    print(f"\nbatch mode: {args.tasks} tasks, {args.sandbox} sandbox, {args.concurrency} tries at "
          f"a time, {args.turnaround:g} s batch turnaround, {STEPS} steps (ideal {ideal:g} s); "
          f"median of {len(good)}; shared machine, load at start {info.get('loadavg_at_start')}")
    if good:
        print(f"  wall        {wall:.1f} s = {wall / ideal:.2f}x steps x turnaround (target <= 1.5x)")
        last = good[-1]
        print(f"  host RSS    {rss:.0f} MB peak (target < 2048 MB); whole process tree "
              f"{tree:.0f} MB PSS peak, at most {last['peak_processes']} processes")
        print(f"  answers     {last['correct']}/{args.tasks} right; "
              f"{last['batch']['batches']} batches, {last['batch']['lines']:,} lines, "
              f"{last['batch']['tries']:,} tries, live requests {last['server']['requests']}")
    name = args.out or f"batch_api-{args.sandbox}.json"
    write_json(name, {"machine": info, "params": {k: v for k, v in vars(args).items()
                                                 if k not in ("serve", "worker", "url")},
                      "results": {"runs": runs, "median_wall_s": wall,
                                  "median_peak_host_rss_mb": rss,
                                  "median_peak_tree_pss_mb": tree}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
