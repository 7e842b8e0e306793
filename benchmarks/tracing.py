"""What tracing costs: sub-queries from REPL code through an RLM, traced or not.

    python benchmarks/tracing.py                     # 5 interleaved rounds
    python benchmarks/tracing.py --quick             # 3 rounds, the batch shape only
    python benchmarks/tracing.py --before 8ccc908    # also the package before sub-call timing

Two shapes: "batch" is one run whose cell sends N=1,000 sub-queries through
``llm_query_batch`` at L=0.5 s (the fan-out target's shape); "tasks" is 200 runs of 2
sub-queries each, 100 at a time, at L=0.25 s (the many-tasks shape, where every
sub-query is one of a batch's first, timed items). Kinds, each in a fresh subprocess:

- before:   the package at ``--before REV`` (git archive of that commit), no timing
- no-extra: tracing off, opentelemetry not importable (as without the [otel] extra)
- off:      tracing off, opentelemetry installed (the default)
- on:       RLM(tracing=True), the OpenTelemetry SDK with a BatchSpanProcessor into an
            exporter that drops the spans

The sub-model is the fake server in its own process; the scripted root runs in the
worker. Each row: median wall seconds and client CPU (``time.process_time``, all threads)
per sub-query. Results go to benchmarks/results/tracing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import ROOT, emit_result, machine_info, median, run_worker, write_json

KINDS = ("before", "no-extra", "off", "on")
SHAPES = {
    "batch": {"n": 1000, "latency": 0.5, "tasks": 1},
    "tasks": {"n": 2, "latency": 0.25, "tasks": 200},
}


# -- worker side -------------------------------------------------------------------


def _worker(spec: dict[str, Any]) -> None:
    kind, shape = spec["kind"], SHAPES[spec["shape"]]
    if kind == "no-extra":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    if kind == "on":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Drop(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)
    import asyncio

    from rlm import RLM, AsyncOpenAIClient
    from rlm.testing import FakeLLMServer

    n = shape["n"]
    code = (f"r = llm_query_batch([f'ECHO {{i}}' for i in range({n})])\n"
            f"FINAL(str(sum(x == str(i) for i, x in enumerate(r))))")
    with FakeLLMServer(scripts={"root": [f"Go.\n```repl\n{code}\n```"]}) as root_srv:
        root = AsyncOpenAIClient(model="root", api_key="k", base_url=root_srv.url, max_retries=0)
        sub = AsyncOpenAIClient(model="sub", api_key="k", base_url=spec["url"],
                                max_concurrency=max(64, n))
        extra = {"tracing": True} if kind == "on" else {}
        rlm = RLM(model="root", recursive_model="sub", client=root, sub_client=sub,
                  sandbox="local", **extra)
        tasks = [("x", f"task {i}") for i in range(shape["tasks"])]
        rlm.completion(context="warm", query="warm up")  # imports, pools, the first worker
        cpu, wall = time.process_time(), time.perf_counter()
        if shape["tasks"] == 1:
            results = [rlm.completion(context="x", query="q")]
        else:
            results = asyncio.run(rlm.acompletion_batch(tasks, max_concurrency=100, progress=False))
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        right = sum(int(r.answer or 0) for r in results)
        rlm.close()
        root.close_sync()
        sub.close_sync()
    calls = n * shape["tasks"]
    emit_result({"wall_s": wall, "cpu_ms_per_subquery": cpu * 1000 / calls, "right": right,
                 "calls": calls, "opentelemetry": any(m.startswith("opentelemetry") and sys.modules[m] is not None
                                                     for m in list(sys.modules))})


# -- parent side -------------------------------------------------------------------


def _before_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _measure(kind: str, shape: str, url: str, before: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("RLM_TRACING", None)
    paths = [str(ROOT / "benchmarks")]
    if kind == "before" and before is not None:
        paths.insert(0, str(before))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    spec = {"kind": kind, "shape": shape, "url": url}
    return run_worker([sys.executable, __file__, "--worker", json.dumps(spec)], 600, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of the batch shape")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, 3 with --quick)")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also measure the package at this commit (the one before sub-call timing)")
    parser.add_argument("--out", default=None, help="file under benchmarks/results/ (default: tracing.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    from rlm.testing import spawn_fake_server

    rounds = args.rounds or (3 if args.quick else 5)
    shapes = ["batch"] if args.quick else list(SHAPES)
    kinds = [k for k in KINDS if k != "before" or args.before]
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {s: {k: [] for k in kinds} for s in shapes}
    with tempfile.TemporaryDirectory(prefix="rlm-before-") as tmp:
        before = _before_tree(args.before, Path(tmp)) if args.before else None
        for shape in shapes:
            with spawn_fake_server(SHAPES[shape]["latency"]) as url:
                for r in range(rounds):
                    # Interleaved, so a change in the machine's load hits every kind alike.
                    for kind in kinds:
                        result = _measure(kind, shape, url, before)
                        rows[shape][kind].append(result)
                        print(f"{shape:6} round {r + 1}/{rounds} {kind:9} {result}", flush=True)
    summary: dict[str, Any] = {}
    for shape in shapes:
        summary[shape] = {}
        for kind in kinds:
            ok = [x for x in rows[shape][kind] if "failed" not in x]
            summary[shape][kind] = {
                "wall_s": median([x["wall_s"] for x in ok]),
                "cpu_ms_per_subquery": median([x["cpu_ms_per_subquery"] for x in ok]),
                "all_right": all(x["right"] == x["calls"] for x in ok) and len(ok) == rounds,
                "imports_opentelemetry": any(x["opentelemetry"] for x in ok),
            }
    print()
    print(f"{'shape':6} {'kind':9} {'wall s':>8} {'CPU ms/sq':>10} {'wall/off':>9} {'CPU/off':>8} "
          f"{'right':>6} {'otel imported':>14}")
    for shape in shapes:
        off = summary[shape]["off"]
        for kind in kinds:
            row = summary[shape][kind]
            wall_ratio = row["wall_s"] / off["wall_s"] if row["wall_s"] and off["wall_s"] else None
            cpu_ratio = (row["cpu_ms_per_subquery"] / off["cpu_ms_per_subquery"]
                         if row["cpu_ms_per_subquery"] and off["cpu_ms_per_subquery"] else None)
            row["wall_vs_off"], row["cpu_vs_off"] = wall_ratio, cpu_ratio
            print(f"{shape:6} {kind:9} {row['wall_s'] or 0:8.2f} {row['cpu_ms_per_subquery'] or 0:10.3f} "
                  f"{wall_ratio or 0:9.3f} {cpu_ratio or 0:8.3f} {str(row['all_right']):>6} "
                  f"{str(row['imports_opentelemetry']):>14}")
    out = args.out or ("tracing-quick.json" if args.quick else "tracing.json")
    path = write_json(out, {"machine": machine_info(), "rounds": rounds, "before": args.before,
                            "shapes": SHAPES, "summary": summary, "runs": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
