"""Sub-query cache benchmark: the three targets of the cache, as medians.

    python benchmarks/cache.py            # 5 rounds of each (about 3 minutes here)
    python benchmarks/cache.py --quick    # 2 rounds

1. cached batch: ``completion_batch`` of 10,000 prompts that are all in the SQLite
   store, through a fresh client (so every reply comes from the store, not from the
   client's memory). Target: under 0.3 s. The server's request counter must not move.
   Wall and CPU time are both reported: on a loaded machine the CPU time (this
   process, all threads) says what the batch costs, the wall time what it waited.
2. miss overhead: N=1000 fan-out at 0.5 s latency (the DESIGN fan-out), three ways,
   each in a fresh worker process, rounds interleaved so machine load hits all alike:
   ``raw`` (no cache, no single-flight), ``default`` (no store: single-flight only)
   and ``store`` (an SQLite store that misses every item and writes every reply).
   Target: ``store`` within 1.05x of ``raw``.
3. demo re-run: the offline demo (needle in 1,000,000 lines, 0.5 s per model call)
   with ``cache=DIR``, first run on an empty directory, then again, in each sandbox.
   Target: the warm run under 20% of the first run's wall time. The warm run sends
   nothing; what is left is local work (starting the sandbox, handing it the 1M-line
   context, the cells' own Python), which a loaded machine inflates the most.

The fake server runs in its own process. The machine may be shared: read medians and
ratios, not single numbers. Results go to benchmarks/results/cache.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import emit_result, machine_info, median, raise_fd_limit, run_worker, write_json

MODEL = "fake-model"
API_KEY = "sk-fake-benchmark"
CACHED_N = 10_000
FANOUT_N = 1000
FANOUT_LATENCY = 0.5
CONFIGS = ("raw", "default", "store")


def _client(url: str, config: str, directory: str | None, n: int) -> Any:
    from rlm import AsyncOpenAIClient

    if config == "raw":
        return AsyncOpenAIClient(model=MODEL, api_key=API_KEY, base_url=url,
                                 max_concurrency=n, cache=None, cache_read=False)
    if config == "default":
        return AsyncOpenAIClient(model=MODEL, api_key=API_KEY, base_url=url, max_concurrency=n)
    return AsyncOpenAIClient(model=MODEL, api_key=API_KEY, base_url=url, max_concurrency=n,
                             cache=directory)


def worker_cached(spec: dict[str, Any]) -> None:
    """Fill a store with N replies, then time fully cached batches through fresh clients."""
    from rlm.loop import run_sync
    from rlm.testing import fetch_stats

    raise_fd_limit()
    url, n, runs = spec["url"], spec["n"], spec["runs"]
    prompts = [f"ECHO cached item {i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as directory:
        filler = _client(url, "store", directory, 256)
        first = run_sync(filler.completion_batch(prompts))
        filler.close_sync()
        times, cpu, sent = [], [], []
        for _ in range(runs):
            client = _client(url, "store", directory, 256)
            before = fetch_stats(url)["requests"]
            start, start_cpu = time.perf_counter(), time.process_time()
            out = run_sync(client.completion_batch(prompts))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            sent.append(fetch_stats(url)["requests"] - before)
            assert out == first, "a cached batch returned different replies"
            cached = client.usage.cached_calls
            client.close_sync()
    emit_result({"times_s": times, "cpu_s": cpu, "requests_sent": sent, "cached_calls": cached})


def worker_fanout(spec: dict[str, Any]) -> None:
    """One warm-up batch, then timed batches of fresh prompts (every one a miss)."""
    from rlm.loop import run_sync

    raise_fd_limit()
    url, n, config, runs = spec["url"], spec["n"], spec["config"], spec["runs"]
    with tempfile.TemporaryDirectory() as directory:
        client = _client(url, config, directory, n)
        run_sync(client.completion_batch([f"ECHO warm {i}" for i in range(n)]))
        times, errors = [], 0
        for r in range(runs):
            prompts = [f"ECHO {spec['round']}-{r}-{i}" for i in range(n)]
            start = time.perf_counter()
            out = run_sync(client.completion_batch(prompts, return_exceptions=True))
            times.append(time.perf_counter() - start)
            errors += sum(1 for p, o in zip(prompts, out, strict=True) if o != p[5:])
        client.close_sync()
    emit_result({"times_s": times, "errors": errors})


def demo_pair(lines: int, latency: float, sandbox: str) -> dict[str, Any]:
    """The demo on an empty cache directory, then again on the warm one."""
    from rlm import demo
    from rlm.core import RLM

    haystack = demo.build_haystack(lines)
    walls, cpus, answers, usage = [], [], [], None
    with tempfile.TemporaryDirectory() as directory, demo.demo_server(latency=latency) as server:
        for _ in range(2):
            before = server.requests
            rlm = RLM(model=demo.ROOT_MODEL, recursive_model=demo.SUB_MODEL, base_url=server.url,
                      api_key="bench", max_concurrency=256, cache=directory, sandbox=sandbox)
            start, start_cpu = time.perf_counter(), time.process_time()
            result = rlm.completion(context=haystack.text, query=demo.QUERY)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
            rlm.close()
            answers.append(result.answer)
            usage = result.total_usage
            sent = server.requests - before
    correct = all((a or "").strip() == haystack.needle for a in answers)
    return {"sandbox": sandbox, "first_s": walls[0], "warm_s": walls[1],
            "ratio": walls[1] / walls[0], "host_cpu_s": cpus,
            "warm_requests": sent, "correct": correct,
            "warm_cached_calls": usage.cached_calls if usage else None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--lines", type=int, default=1_000_000, help="demo haystack lines")
    parser.add_argument("--only", choices=["cached", "fanout", "demo"], action="append")
    parser.add_argument("--demo-sandbox", choices=["process", "local"], action="append",
                        help="sandbox(es) for the demo re-run (default: both)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        {"cached": worker_cached, "fanout": worker_fanout}[spec["kind"]](spec)
        return 0

    from rlm.testing import spawn_fake_server

    rounds = 2 if args.quick else args.rounds
    only = set(args.only or ("cached", "fanout", "demo"))
    data: dict[str, Any] = {"machine": machine_info(), "rounds": rounds,
                            "note": "shared 2-core machine: medians and ratios"}
    me = [sys.executable, str(Path(__file__).resolve())]

    if "cached" in only:
        with spawn_fake_server(0.0) as url:
            spec = {"kind": "cached", "url": url, "n": CACHED_N, "runs": rounds}
            res = run_worker([*me, "--worker", json.dumps(spec)], timeout=600)
        med = median(res.get("times_s", []))
        data["cached_batch"] = {**res, "n": CACHED_N, "median_s": med, "target_s": 0.3,
                                "met": med is not None and med < 0.3
                                and not any(res.get("requests_sent", [1]))}
        data["cached_batch"]["median_cpu_s"] = median(res.get("cpu_s", []))
        print(f"cached completion_batch of {CACHED_N:,}: median {med:.3f} s wall, "
              f"{data['cached_batch']['median_cpu_s']:.3f} s CPU "
              f"(runs {[round(t, 3) for t in res.get('times_s', [])]}), requests sent "
              f"{res.get('requests_sent')}")

    if "fanout" in only:
        times: dict[str, list[float]] = {c: [] for c in CONFIGS}
        errors = 0
        with spawn_fake_server(FANOUT_LATENCY) as url:
            for r in range(rounds):
                for config in CONFIGS:
                    spec = {"kind": "fanout", "url": url, "n": FANOUT_N, "config": config,
                            "runs": 2, "round": r}
                    res = run_worker([*me, "--worker", json.dumps(spec)], timeout=300)
                    if "failed" in res:
                        print(f"  {config}: {res['failed']}")
                        continue
                    times[config] += res["times_s"]
                    errors += res["errors"]
        meds = {c: median(times[c]) for c in CONFIGS}
        raw = meds["raw"]
        ratios = {c: (meds[c] / raw if meds[c] and raw else None) for c in CONFIGS}
        data["miss_overhead"] = {
            "n": FANOUT_N, "latency_s": FANOUT_LATENCY, "times_s": times, "median_s": meds,
            "ratio_to_raw": ratios, "errors": errors, "target_ratio": 1.05,
            "met": ratios["store"] is not None and ratios["store"] <= 1.05 and not errors,
        }
        for c in CONFIGS:
            print(f"fan-out N={FANOUT_N} L={FANOUT_LATENCY} {c:8s}: median {meds[c]:.3f} s "
                  f"({ratios[c]:.3f}x raw)")

    if "demo" in only:
        data["demo_rerun"] = {}
        for sandbox in args.demo_sandbox or ("process", "local"):
            pairs = [demo_pair(args.lines, 0.5, sandbox) for _ in range(max(1, rounds // 2 + 1))]
            ratio = median([p["ratio"] for p in pairs])
            row = data["demo_rerun"][sandbox] = {
                "lines": args.lines, "latency_s": 0.5, "pairs": pairs,
                "median_first_s": median([p["first_s"] for p in pairs]),
                "median_warm_s": median([p["warm_s"] for p in pairs]),
                "median_ratio": ratio, "target_ratio": 0.2,
                "met": ratio is not None and ratio < 0.2 and all(p["correct"] for p in pairs),
            }
            print(f"demo re-run ({sandbox} sandbox): first {row['median_first_s']:.2f} s, warm "
                  f"{row['median_warm_s']:.2f} s, ratio {ratio:.3f} (requests on the warm "
                  f"run: {[p['warm_requests'] for p in pairs]})")

    name = "cache-quick.json" if args.quick else "cache.json"
    if args.only:
        name = "cache-partial.json"
    print(f"wrote {write_json(name, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
