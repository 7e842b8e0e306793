"""Many tasks: 1,000 RLM runs, each over a 20,000-line context, 200 at a time.

Each task is 2 root turns and 2 sub-queries at 0.25 s per model call (the issue's
shape): turn 1 runs one cell that sends a batch of two sub-queries, turn 2 calls
FINAL. Two shapes of sub-query:

- tiny (the default): two short prompts per task (``ECHO {context[:12]}`` and the
  context's length), over a 980 KB context that never leaves the sandbox;
- ``--chunked`` (the real shape): each task has a context of its own (20,000 lines of
  15 characters, 300 KB), cut in two halves, and each half goes out as a sub-query
  prompt through ``llm_query_batch``: about 300 KB of prompt per task, which crosses
  the sandbox's boundary, is keyed for dedupe, JSON-encoded and sent; replies are
  short. (The tiny shape's 4 shared contexts would let identical chunks in flight go
  out once.)

The fake server runs in its own process (scripted root, echo sub-model, the fast path
for chat completions) so its CPU does not count against the client's; each run also
reports the server's own CPU seconds. The latency alone allows about
200 / (3 x 0.25 s) = 267 tasks/s; targets: >= 100 tasks/s in the process sandbox and
>= 150 in-process (chunked: >= 120 and >= 150), on 2 cores. Reports the median of
``--runs``; the machine may be shared, so the JSON also records the load average at
the start.

    python benchmarks/many_tasks.py [--tasks 1000] [--concurrency 200] [--latency 0.25]
        [--lines 20000] [--sandbox local|process|both] [--runs 3] [--api job|batch]
        [--shape tiny|chunked|both | --chunked] [--before GIT_REF]

``--api job`` goes through ``RLM.run_job`` (writing a results file, as ``rlm batch``
does); ``--api batch`` through ``RLM.acompletion_batch`` (what existed before jobs).
``--before GIT_REF`` measures the package as of that commit too, run by run in turn with
the working tree, and writes ``many_tasks-compare.json`` instead: the before/after
numbers of an optimisation on a shared machine. The JSON (``many_tasks-<api>.json``) keeps the tiny shape under ``results`` and adds
the chunked one under ``chunked``; a run of one shape keeps the other's numbers from
the file already there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, emit_result, machine_info, run_worker, write_json  # noqa: E402

ROOT_MODEL = "bench-root"
SUB_MODEL = "bench-sub"
TURN_1 = (
    "I will ask two sub-questions.\n```repl\n"
    "answers = llm_query_batch([f'ECHO {context[:12]}', 'ECHO ' + str(len(context))])\n"
    "print(answers)\n```"
)
TURN_2 = "Done.\n```repl\nFINAL(answers[1])\n```"
# The chunked shape: model names of their own, so one server process serves both shapes.
CHUNKED_ROOT_MODEL = "bench-root-chunked"
CHUNKED_TURN_1 = (
    "I will ask about each half of the context.\n```repl\n"
    "half = len(context) // 2\n"
    "chunks = [context[:half], context[half:]]\n"
    "answers = llm_query_batch([f'Excerpt {i + 1} of 2. Which ids appear twice?\\n{chunk}'\n"
    "                           for i, chunk in enumerate(chunks)])\n"
    "print([answer[:40] for answer in answers])\n```"
)
# The echo sub-model answers "fake answer to: " and the prompt's first 60 characters, so
# the answer is right only when both halves went out and came back in order.
CHUNKED_TURN_2 = (
    "Done.\n```repl\n"
    "ok = answers[0].startswith('fake answer to: Excerpt 1 of 2') and "
    "answers[1].startswith('fake answer to: Excerpt 2 of 2')\n"
    "FINAL(str(len(chunks[0]) + len(chunks[1])) if ok else 'wrong: ' + answers[0][:40])\n```"
)


def serve(latency: float) -> None:
    """Run the scripted fake server until killed, printing READY <url> once listening."""
    from rlm.testing import FakeLLMServer

    async def main() -> None:
        server = FakeLLMServer(
            scripts={ROOT_MODEL: [TURN_1, TURN_2], CHUNKED_ROOT_MODEL: [CHUNKED_TURN_1, CHUNKED_TURN_2]},
            latency=latency,
            # Prefix-cache accounting hashes every 512 characters of each prompt: with
            # 150 KB chunks it was 40% of the server's CPU, which the client would pay
            # for on 2 shared cores. The benchmark reads no cached-token counts.
            prefix_cache=False,
        )
        await server.astart()
        # As python -m rlm.testing does: long-lived objects out of the collector's scans,
        # which cut the server's CPU per request by about a quarter.
        gc.collect()
        gc.freeze()
        print(f"READY {server.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def make_context(lines: int, variant: int) -> str:
    return "".join(f"{variant:02d} line {i:06d}: some log text of moderate length\n" for i in range(lines))


def chunked_contexts(lines: int, tasks: int) -> Iterator[str]:
    """A context of its own for every task: 15 characters a line, so 20,000 lines are
    300 KB (the prompt the issue measured), each line tagged with the task's number, so
    no two tasks send the same chunk (identical requests in flight would go out once)."""
    base = "".join(f"@@@@ {i % 100_000:05d} evt\n" for i in range(lines))
    for task in range(tasks):
        yield base.replace("@@@@", f"{task % 10_000:04d}")


def worker(args: argparse.Namespace) -> None:
    """One measured run in a fresh process: build the tasks, run them, emit the numbers."""
    from rlm import RLM

    if args.shape == "chunked":
        contexts = list(chunked_contexts(args.lines, args.tasks))
    else:
        contexts = [make_context(args.lines, v) for v in range(4)]
    tasks = [
        {"id": i, "query": "How long is the context?", "context": contexts[i % len(contexts)]}
        for i in range(args.tasks)
    ]
    root = CHUNKED_ROOT_MODEL if args.shape == "chunked" else ROOT_MODEL
    rlm = RLM(model=root, recursive_model=SUB_MODEL, base_url=args.url, api_key="bench",
              sandbox=args.sandbox, max_concurrency=max(64, 2 * args.concurrency))
    cpu0 = os.times()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.api == "job":
            summary = rlm.run_job(tasks, Path(tmp) / "out.jsonl", concurrency=args.concurrency,
                                  progress=False)
            records = [json.loads(x) for x in (Path(tmp) / "out.jsonl").read_text().splitlines()]
            answers = [r["answer"] for r in records]
            failed = summary.failed
        else:
            results = asyncio.run(rlm.acompletion_batch(
                [(t["context"], t["query"]) for t in tasks], max_concurrent=args.concurrency,
                progress=False))
            answers = [r.answer for r in results]
            failed = sum(1 for r in results if r.error)
    wall = time.perf_counter() - started
    cpu1 = os.times()
    rlm.close()
    correct = sum(1 for a in answers if a == str(len(contexts[0])))
    emit_result({
        "tasks_per_s": args.tasks / wall,
        "wall_s": wall,
        "user_s": cpu1.user - cpu0.user,
        "sys_s": cpu1.system - cpu0.system,
        "children_user_s": cpu1.children_user - cpu0.children_user,
        "children_sys_s": cpu1.children_system - cpu0.children_system,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "failed": failed,
        "correct": correct,
    })


def spawn_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, shape: str, sandboxes: list[str],
            server: subprocess.Popen[str], url: str,
            versions: dict[str, dict[str, str] | None]) -> dict[str, Any]:
    """``args.runs`` runs of ``shape`` per sandbox and version, each in a fresh process
    (the versions interleaved run by run, so a shared machine's load falls on each alike);
    the rows, per sandbox (and per version when there are several)."""
    rows: dict[str, Any] = {}
    for sandbox in sandboxes:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in versions}
        for _ in range(args.runs):
            for name, env in versions.items():
                cmd = [sys.executable, __file__, "--worker", "--url", url, "--sandbox", sandbox,
                       "--tasks", str(args.tasks), "--concurrency", str(args.concurrency),
                       "--lines", str(args.lines), "--api", args.api, "--shape", shape]
                cpu0 = process_cpu_s(server.pid)
                result = run_worker(cmd, timeout=1800, env=env)
                cpu1 = process_cpu_s(server.pid)
                if cpu0 is not None and cpu1 is not None:
                    result["server_cpu_s"] = round(cpu1 - cpu0, 2)
                if "user_s" in result:
                    result["host_cpu_ms_per_task"] = round(
                        1000 * sum(result[k] for k in ("user_s", "sys_s", "children_user_s",
                                                       "children_sys_s")) / args.tasks, 2)
                result["loadavg_1m"] = round(os.getloadavg()[0], 2)
                runs[name].append(result)
                print(shape, sandbox, name, json.dumps(result), flush=True)
        summary = {name: _summary(got) for name, got in runs.items()}
        rows[sandbox] = summary["now"] if list(summary) == ["now"] else summary
    return rows


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "tasks_per_s" in r]
    return {
        "runs": runs,
        "median_tasks_per_s": statistics.median(r["tasks_per_s"] for r in good) if good else None,
        "median_host_cpu_ms_per_task": (
            statistics.median(r["host_cpu_ms_per_task"] for r in good) if good else None),
    }


def export_version(ref: str, into: str) -> str:
    """The package at git ``ref``, exported into ``into``: a PYTHONPATH for "before" runs
    (the sandbox's own processes start with cwd /, so they import it too)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", ref, "rlm"], cwd=root, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


TARGETS = {"tiny": {"local": 150, "process": 100}, "chunked": {"local": 150, "process": 120}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--sandbox", choices=["local", "process", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--api", choices=["job", "batch"], default="job")
    parser.add_argument("--shape", choices=["tiny", "chunked", "both"], default="both",
                        help="tiny sub-queries, the context's chunks, or both (default)")
    parser.add_argument("--chunked", action="store_const", const="chunked", dest="shape",
                        help="the same as --shape chunked")
    parser.add_argument("--before", metavar="GIT_REF", default=None,
                        help="also run the package as of GIT_REF, interleaved run by run with "
                        "the working tree, and report both (many_tasks-compare.json)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results JSON name (default many_tasks-<api>.json)")
    args = parser.parse_args()
    if args.serve:
        serve(args.latency)
        return 0
    if args.worker:
        worker(args)
        return 0
    sandboxes = ["local", "process"] if args.sandbox == "both" else [args.sandbox]
    shapes = ["tiny", "chunked"] if args.shape == "both" else [args.shape]
    info = machine_info()
    with tempfile.TemporaryDirectory() as before_dir:
        versions: dict[str, dict[str, str] | None] = {"now": None}
        if args.before:
            path = export_version(args.before, before_dir)
            versions = {"before": {**os.environ, "PYTHONPATH": path}, "after": None}
        server, url = spawn_server(args.latency)
        measured: dict[str, dict[str, Any]] = {}
        try:
            for shape in shapes:
                measured[shape] = measure(args, shape, sandboxes, server, url, versions)
        finally:
            server.kill()
            server.wait()
    floor = args.concurrency / (3 * args.latency)
    print(f"\nmany tasks: {args.tasks} tasks x {args.lines:,} lines, {args.concurrency} at a time, "
          f"{args.latency:g} s per call (latency floor ~{floor:.0f} tasks/s), api={args.api}, "
          f"median of {args.runs}; shared machine, load at start {info.get('loadavg_at_start')}")
    print(f"  {'shape':8s} {'sandbox':8s} {'version':8s} {'tasks/s':>8s} {'target':>7s}"
          f" {'host CPU/task':>14s} {'server CPU':>11s}")
    for shape, rows in measured.items():
        for sandbox, row in rows.items():
            for name, summary in (row.items() if args.before else [("now", row)]):
                value = summary["median_tasks_per_s"]
                shown = "failed" if value is None else f"{value:.1f}"
                cpu = summary["median_host_cpu_ms_per_task"]
                servers = [r["server_cpu_s"] for r in summary["runs"] if "server_cpu_s" in r]
                print(f"  {shape:8s} {sandbox:8s} {name:8s} {shown:>8s}"
                      f" {'>= ' + str(TARGETS[shape][sandbox]):>7s}"
                      f" {'-' if cpu is None else f'{cpu:.2f} ms':>14s}"
                      f" {f'{statistics.median(servers):.1f} s' if servers else '-':>11s}")
    params = {k: v for k, v in vars(args).items() if k not in ("serve", "worker", "url", "shape")}
    if args.before:
        write_json(args.out or "many_tasks-compare.json",
                   {"machine": info, "params": {**params, "shapes": shapes}, "results": measured})
        return 0
    name = args.out or f"many_tasks-{args.api}.json"
    data: dict[str, Any] = {}
    previous = RESULTS / name
    if previous.exists():
        # A run of one shape keeps the other shape's numbers (and their own params).
        try:
            data = json.loads(previous.read_text())
        except ValueError:
            data = {}
    if "tiny" in measured:
        data.update({"machine": info, "params": params, "results": measured["tiny"]})
    if "chunked" in measured:
        data["chunked"] = {"machine": info, "params": params, "results": measured["chunked"]}
    write_json(name, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
