"""In-process REPL benchmark: cell overhead, deadline instrumentation, fan-out from a cell.

    python benchmarks/repl.py            # full run (about half a minute here)
    python benchmarks/repl.py --quick    # fewer repetitions

Measured through the public ``REPLEnv`` API (sandbox="local"):

- cell overhead: an empty cell through ``env.execute`` (and ``await env.aexecute``),
  median of many;
- instrumentation: a 10^6-iteration tight loop (and two everyday variants) run as a
  cell vs plain ``exec`` of the same source in this thread, median of several, ratio;
- ``llm_query_batch`` of 1000 prompts from a cell vs ``client.completion_batch`` of the
  same prompts called directly, one shared client (max_concurrency=1000), against a fake
  OpenAI server in its own process at 0.5 s latency; rounds interleaved, median, ratio.

Targets (issue 3): cell overhead < 1 ms; tight loop at most 1.5x plain exec; batch from
a cell within 1.1x of the direct call. Results: benchmarks/results/repl.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from _common import fmt_s, machine_info, median, raise_fd_limit, write_json

from rlm import AsyncOpenAIClient, REPLEnv
from rlm.loop import run_sync
from rlm.testing import spawn_fake_server

N_BATCH = 1000
LATENCY = 0.5

LOOPS = {
    "tight loop (total = total + i)": "total = 0\nfor i in range(10**6):\n    total = total + i",
    "append loop (out.append(i))": "out = []\nfor i in range(10**6):\n    out.append(i)",
    "counting loop (d[k] += 1)": "d = dict.fromkeys(range(97), 0)\nfor i in range(10**6):\n    d[i % 97] += 1",
}


def cell_overhead(env: REPLEnv, repeats: int) -> dict[str, Any]:
    """Median wall time of an empty cell, sync and async."""
    for _ in range(50):
        env.execute("")
    sync = []
    for _ in range(repeats):
        started = time.perf_counter()
        env.execute("")
        sync.append(time.perf_counter() - started)

    async def run_async() -> list[float]:
        out = []
        for _ in range(repeats):
            started = time.perf_counter()
            await env.aexecute("")
            out.append(time.perf_counter() - started)
        return out

    asynchronous = asyncio.run(run_async())
    return {"sync_ms": median(sync) * 1000, "async_ms": median(asynchronous) * 1000}


def loop_ratio(env: REPLEnv, source: str, repeats: int) -> dict[str, Any]:
    """A loop as a cell vs plain exec of the same source (both on one thread each)."""
    code = compile(source, "<plain>", "exec")
    plain, cell = [], []
    for _ in range(repeats):
        ns: dict[str, Any] = {}
        started = time.perf_counter()
        exec(code, ns)  # noqa: S102 - the baseline being measured
        plain.append(time.perf_counter() - started)
        r = env.execute(source)
        assert r.error is None, r.error
        cell.append(r.duration_s)
    p, c = median(plain), median(cell)
    return {"plain_s": p, "cell_s": c, "ratio": c / p}


def batch_ratio(rounds: int) -> dict[str, Any]:
    """llm_query_batch of N_BATCH from a cell vs completion_batch directly, interleaved."""
    raise_fd_limit()
    prompts = [f"ECHO {i}" for i in range(N_BATCH)]
    with spawn_fake_server(latency=LATENCY) as url:
        client = AsyncOpenAIClient(
            model="fake-model", api_key="bench", base_url=url, max_concurrency=N_BATCH
        )
        env = REPLEnv(client=client, timeout=600, sandbox="local")
        env.execute(f"prompts = [f'ECHO {{i}}' for i in range({N_BATCH})]")
        # Warm the pool and both paths once.
        run_sync(client.completion_batch(prompts))
        env.execute("warm = llm_query_batch(prompts)")
        cell, direct = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            r = env.execute("answers = llm_query_batch(prompts)\nok = answers[-1]")
            cell.append(time.perf_counter() - started)
            assert r.error is None and r.sub_calls == N_BATCH, r
            assert env.get("ok") == str(N_BATCH - 1)
            started = time.perf_counter()
            answers = run_sync(client.completion_batch(prompts))
            direct.append(time.perf_counter() - started)
            assert answers[-1] == str(N_BATCH - 1)
        env.close()
        client.close_sync()
    c, d = median(cell), median(direct)
    return {"cell_s": c, "direct_s": d, "ratio": c / d, "n": N_BATCH, "latency_s": LATENCY}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    overhead_n, loop_n, batch_n = (200, 3, 1) if args.quick else (2000, 9, 3)

    env = REPLEnv(timeout=600, sandbox="local")
    overhead = cell_overhead(env, overhead_n)
    loops = {name: loop_ratio(env, src, loop_n) for name, src in LOOPS.items()}
    env.close()
    batch = batch_ratio(batch_n)

    tight = loops["tight loop (total = total + i)"]
    rows = [
        ("empty cell, execute", f"{overhead['sync_ms']:.3f} ms", "< 1 ms", overhead["sync_ms"] < 1),
        ("empty cell, aexecute", f"{overhead['async_ms']:.3f} ms", "< 1 ms", overhead["async_ms"] < 1),
    ]
    for name, res in loops.items():
        target = "<= 1.5x" if res is tight else "(info)"
        rows.append(
            (f"{name}: cell {fmt_s(res['cell_s'], 3)} s vs exec {fmt_s(res['plain_s'], 3)} s",
             f"{res['ratio']:.2f}x", target, res["ratio"] <= 1.5 if res is tight else None)
        )
    rows.append(
        (f"llm_query_batch({N_BATCH}) @ {LATENCY} s: cell {fmt_s(batch['cell_s'])} s vs direct "
         f"{fmt_s(batch['direct_s'])} s", f"{batch['ratio']:.2f}x", "<= 1.1x", batch["ratio"] <= 1.1)
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>10}  {'target':>8}  met")
    for name, value, target, met in rows:
        mark = "-" if met is None else ("yes" if met else "NO")
        print(f"{name.ljust(width)}  {value:>10}  {target:>8}  {mark}")

    path = write_json(
        "repl-quick.json" if args.quick else "repl.json",
        {
            "machine": machine_info(),
            "cell_overhead": overhead,
            "loops": loops,
            "batch": batch,
            "targets": {
                "cell_overhead_ms": 1.0,
                "tight_loop_ratio": 1.5,
                "batch_ratio": 1.1,
            },
        },
    )
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
