"""What serving costs: RLM runs through ``rlm serve`` (HTTP, the openai SDK) vs in-process.

Every task is the same small RLM: 2 root turns and one ``llm_query_batch`` of 10
sub-queries over its context, at ``--latency`` seconds per model call, against
FakeLLMServer. Two measurements, each as the median of ``--runs``:

- one request at a time: the wall time of a single run in-process (``RLM.acompletion``)
  and through ``rlm serve`` (openai SDK, non-streaming), and the difference;
- many at once: ``--tasks`` runs, ``--running`` at a time, in-process with
  ``acompletion_batch(max_concurrent=running)`` and through ``rlm serve --max-running
  running`` with all requests sent at once; tasks/s for both and their ratio.

    python benchmarks/serve.py [--tasks 100] [--running 20] [--latency 0.25] [--runs 3]
                               [--sandbox process]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import threading
import time
from typing import Any

import openai
from _common import machine_info, median, write_json
from rich.console import Console
from rich.table import Table

from rlm import RLM
from rlm.testing import FakeLLMServer

ROOT, SUB = "bench-root", "bench-sub"
SCRIPT = [
    "Fan out.\n```repl\nparts = [context[i::10] for i in range(10)]\n"
    "replies = llm_query_batch(['ECHO ' + p[:20] for p in parts])\nprint(len(replies))\n```",
    "Done.\n```repl\nFINAL(str(len(replies)))\n```",
]
CONTEXT = "lorem ipsum dolor sit amet " * 400


class Served:
    """``rlm serve`` in a subprocess, up until ``close()``."""

    def __init__(self, upstream: str, running: int, tasks: int, sandbox: str) -> None:
        cmd = [sys.executable, "-m", "rlm.cli", "serve", "--port", "0", "--base-url", upstream,
               "--api-key", "bench", "--model", ROOT, "--recursive-model", SUB, "--sandbox", sandbox,
               "--max-running", str(running), "--max-queue", str(tasks), "--max-concurrency", "256"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.url = ""
        for line in self.proc.stderr:
            found = re.search(r"listening on (http://\S+/v1)", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            raise RuntimeError("rlm serve did not start")
        # Keep draining stderr (one access line per request) so the server never blocks on it.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def served_batch(url: str, tasks: int) -> float:
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(
            client.chat.completions.create(model="rlm", messages=[
                {"role": "system", "content": CONTEXT}, {"role": "user", "content": "How many parts?"}])
            for _ in range(tasks)))
        wall = time.perf_counter() - start
    assert all(r.choices[0].message.content == "10" for r in replies)
    return wall


async def served_single(url: str) -> float:
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        reply = await client.chat.completions.create(model="rlm", messages=[
            {"role": "system", "content": CONTEXT}, {"role": "user", "content": "How many parts?"}])
        wall = time.perf_counter() - start
    assert reply.choices[0].message.content == "10"
    return wall


async def local_batch(rlm: RLM, tasks: int, running: int) -> float:
    start = time.perf_counter()
    results = await rlm.acompletion_batch([(CONTEXT, "How many parts?")] * tasks, max_concurrent=running,
                                          progress=False)
    wall = time.perf_counter() - start
    assert all(r.answer == "10" for r in results)
    return wall


async def local_single(rlm: RLM) -> float:
    start = time.perf_counter()
    result = await rlm.acompletion(CONTEXT, "How many parts?")
    assert result.answer == "10"
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--running", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sandbox", choices=["local", "process"], default="process")
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"local_single": [], "served_single": [], "local_batch": [], "served_batch": []}
    with FakeLLMServer(scripts={ROOT: SCRIPT}, latency=args.latency) as upstream:
        rlm = RLM(model=ROOT, recursive_model=SUB, base_url=upstream.url, api_key="bench",
                  sandbox=args.sandbox, max_concurrency=256)
        served = Served(upstream.url, args.running, args.tasks, args.sandbox)

        async def measure() -> None:
            await served_single(served.url)  # warm both paths once
            await local_single(rlm)
            for _ in range(args.runs):
                rows["local_single"].append(await local_single(rlm))
                rows["served_single"].append(await served_single(served.url))
                rows["local_batch"].append(await local_batch(rlm, args.tasks, args.running))
                rows["served_batch"].append(await served_batch(served.url, args.tasks))
            await rlm.aclose()

        try:
            asyncio.run(measure())
        finally:
            served.close()
    med: dict[str, Any] = {k: median(v) for k, v in rows.items()}
    local_tps, served_tps = args.tasks / med["local_batch"], args.tasks / med["served_batch"]
    table = Table(title=f"rlm serve vs in-process: 2 root turns + 10 sub-queries per task at "
                        f"{args.latency:g} s per call, sandbox={args.sandbox} (median of {args.runs}; "
                        "shared 2-core machine)")
    for col in ("measure", "in-process", "rlm serve", "serve / in-process"):
        table.add_column(col, justify="right")
    table.add_row("one request, wall s", f"{med['local_single']:.3f}", f"{med['served_single']:.3f}",
                  f"+{(med['served_single'] - med['local_single']) * 1000:.0f} ms")
    table.add_row(f"{args.tasks} tasks, {args.running} at a time, tasks/s", f"{local_tps:.1f}",
                  f"{served_tps:.1f}", f"{served_tps / local_tps:.2f}x")
    Console().print(table)
    path = write_json("serve.json", {
        "machine": machine_info(), "args": vars(args), "runs": rows, "median_s": med,
        "tasks_per_s": {"in_process": local_tps, "served": served_tps},
        "single_overhead_s": med["served_single"] - med["local_single"],
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
