"""The client under a rate-limit storm and against a token bucket (issue: no hang, no collapse).

- storm: 10,000 sub-queries through ``completion_batch`` at 0.2 s latency while the
  server answers 20% of requests at random with a 429 (Retry-After 0.3 s) or a 503 (no
  Retry-After). Target: every item right, in under 30 s. The same batch without faults
  runs alternately, so the cost of the storm reads as a ratio even on a busy machine.
- bucket: 4,000 sub-queries at 0.1 s latency against a token bucket of 400 requests/s
  (burst 400). The floor is (4,000 - 400) / 400 + 0.1 = 9.1 s. Target: within 1.2x the
  floor, with 429s at most 10% of requests.

The fake server runs in its own process (``python -m rlm.testing --fault-rate ...`` /
``--rate-limit ...``), so its CPU does not compete with the client's interpreter. Each
scenario runs ``--repeat`` times; the JSON (benchmarks/results/limits.json) keeps every
run and the medians. The machine may be shared: read the numbers as medians.

    python benchmarks/limits.py [--repeat 3] [--only storm|bucket]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, median, raise_fd_limit, write_json  # noqa: E402

from rlm import AsyncOpenAIClient  # noqa: E402
from rlm.loop import run_sync  # noqa: E402
from rlm.testing import fetch_stats, spawn_fake_server  # noqa: E402

STORM = {"n": 10_000, "latency": 0.2, "fault_rate": 0.2, "retry_after": 0.3,
         "max_concurrency": 1000, "target_s": 30.0}
BUCKET = {"n": 4_000, "latency": 0.1, "rate": 400.0, "burst": 400.0, "max_concurrency": 256,
          "target_ratio": 1.2, "target_429_share": 0.10}


def _batch(url: str, n: int, max_concurrency: int) -> dict[str, Any]:
    client = AsyncOpenAIClient(model="fake-model", api_key="bench", base_url=url,
                               max_concurrency=max_concurrency, max_retries=20)
    prompts = [f"ECHO {i}" for i in range(n)]
    try:
        start = time.perf_counter()
        cpu = time.process_time()
        out = run_sync(client.completion_batch(prompts, return_exceptions=True))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        usage = client.usage
        final_limit = client.concurrency_limit
    finally:
        client.close_sync()
    stats = fetch_stats(url)
    right = sum(1 for i, r in enumerate(out) if r == str(i))
    return {
        "wall_s": round(wall, 3),
        "client_cpu_s": round(cpu, 3),
        "items_right": right,
        "items": n,
        "requests": stats["requests"],
        "faults_served": stats["faults_served"],
        "retries": usage.retries,
        "failed_calls": usage.failed_calls,
        "final_concurrency_limit": final_limit,
    }


def storm(repeat: int) -> dict[str, Any]:
    args = ["--fault-rate", str(STORM["fault_rate"]), "--retry-after", str(STORM["retry_after"]),
            "--retry-after-on", "429"]
    runs, clean = [], []
    for i in range(repeat):
        # The same batch without faults, alternating, measures what this machine gives
        # right now: on a shared machine the ratio says more than the wall time.
        with spawn_fake_server(STORM["latency"]) as url:
            clean.append(_batch(url, int(STORM["n"]), int(STORM["max_concurrency"])))
        print(f"no-fault run {i + 1}: {clean[-1]}", flush=True)
        with spawn_fake_server(STORM["latency"], extra_args=[*args, "--seed", str(i)]) as url:
            runs.append(_batch(url, int(STORM["n"]), int(STORM["max_concurrency"])))
        print(f"storm run {i + 1}: {runs[-1]}", flush=True)
    wall = median([r["wall_s"] for r in runs])
    clean_wall = median([r["wall_s"] for r in clean])
    return {
        "config": STORM,
        "runs": runs,
        "no_fault_runs": clean,
        "median_wall_s": wall,
        "median_no_fault_wall_s": clean_wall,
        "ratio_to_no_fault": round(wall / clean_wall, 3) if wall and clean_wall else None,
        "expected_ratio_1_over_1_minus_p": round(1 / (1 - STORM["fault_rate"]), 3),
        "all_items_right": all(r["items_right"] == r["items"] for r in runs),
        "target_met": bool(wall is not None and wall < STORM["target_s"]
                           and all(r["items_right"] == r["items"] for r in runs)),
    }


def bucket(repeat: int) -> dict[str, Any]:
    args = ["--rate-limit", str(BUCKET["rate"]), "--burst", str(BUCKET["burst"])]
    floor = (BUCKET["n"] - BUCKET["burst"]) / BUCKET["rate"] + BUCKET["latency"]
    runs = []
    for i in range(repeat):
        with spawn_fake_server(BUCKET["latency"], extra_args=args) as url:
            run = _batch(url, int(BUCKET["n"]), int(BUCKET["max_concurrency"]))
        run["ratio_to_floor"] = round(run["wall_s"] / floor, 3)
        run["share_429"] = round(run["faults_served"] / run["requests"], 4)
        runs.append(run)
        print(f"bucket run {i + 1}: {run}", flush=True)
    ratio = median([r["ratio_to_floor"] for r in runs])
    share = median([r["share_429"] for r in runs])
    return {
        "config": BUCKET,
        "floor_s": round(floor, 3),
        "runs": runs,
        "median_ratio_to_floor": ratio,
        "median_share_429": share,
        "target_met": bool(ratio is not None and share is not None
                           and ratio <= BUCKET["target_ratio"]
                           and share <= BUCKET["target_429_share"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["storm", "bucket"])
    args = parser.parse_args()
    raise_fd_limit()
    result: dict[str, Any] = {"machine": machine_info(), "note": "shared 2-core machine; medians"}
    if args.only in (None, "storm"):
        result["storm"] = storm(args.repeat)
    if args.only in (None, "bucket"):
        result["bucket"] = bucket(args.repeat)
    name = "limits.json" if args.only is None else f"limits-{args.only}.json"
    path = write_json(name, result)
    for key in ("storm", "bucket"):
        if key in result:
            summary = {k: v for k, v in result[key].items() if k not in ("runs", "config")}
            print(f"{key}: {summary}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
