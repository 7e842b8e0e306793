"""Fan-out benchmark: N sub-queries at latency L, four ways, against a fake server.

    python benchmarks/fanout.py            # full grid (about 20 minutes here)
    python benchmarks/fanout.py --quick    # a short run that still checks the targets

The fake OpenAI server runs in its own process (``rlm.testing.spawn_fake_server``).
Each client kind runs in a fresh subprocess of this script, so its CPU time
(``time.process_time``, all threads) holds nothing but its own work:

- sequential: the openai SDK's sync client, one call after another;
- executor:   the same sync calls on a ``ThreadPoolExecutor`` ("fake async");
- ours:       ``AsyncOpenAIClient.completion_batch`` with max_concurrency=N, called
              from sync code through ``rlm.loop.run_sync`` as REPL code would;
- bare:       one aiohttp ``ClientSession`` with ``TCPConnector(limit=N)`` posting the
              same JSON bodies with the same Authorization header: the floor here.

Every prompt is ``"ECHO i"`` and the fake server answers ``"i"``, so a wrong, missing
or failed answer counts as an error. Results go to benchmarks/results/fanout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from _common import (
    emit_result,
    fmt_s,
    machine_info,
    median,
    raise_fd_limit,
    run_worker,
    write_json,
)

MODEL = "fake-model"
API_KEY = "sk-fake-benchmark"
KINDS = ("sequential", "executor", "ours", "bare")
SHORT = {"sequential": "sequential", "executor": "executor", "ours": "ours", "bare": "bare (floor)"}
# The reference experiment: 4 parallel queries against gpt-4o-mini at about 2 s each.
REFERENCE = {"n": 4, "latency": 2.0, "sequential": 8.2, "executor": 4.5, "ours": 2.3}
SEQUENTIAL_MAX_N = 100
SLOW_RUN_S = 30.0  # a row whose single run takes longer than this is measured once

Runner = Callable[[list[str]], list[Any]]


@dataclass
class Client:
    """One client kind, set up in a worker: run a batch, report extras, close."""

    run: Runner
    close: Callable[[], None]
    extras: Callable[[], dict[str, Any]] = dict


# -- worker side: one client kind, one N, in a fresh process -------------------------


def _body(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}


def _sync_sdk(url: str) -> Any:
    import openai

    # The SDK's defaults, as a user would write it.
    return openai.OpenAI(base_url=url, api_key=API_KEY)


def _sdk_call(sdk: Any, prompt: str) -> Any:
    try:
        reply = sdk.chat.completions.create(model=MODEL, messages=_body(prompt)["messages"])
        return reply.choices[0].message.content
    except Exception as exc:  # noqa: BLE001 - counted as an error by the caller
        return exc


def _make_sequential(url: str, n: int, pool: int) -> Client:
    sdk = _sync_sdk(url)

    def run(prompts: list[str]) -> list[Any]:
        return [_sdk_call(sdk, p) for p in prompts]

    return Client(run, sdk.close)


def _make_executor(url: str, n: int, pool: int) -> Client:
    import concurrent.futures

    sdk = _sync_sdk(url)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=pool)

    def run(prompts: list[str]) -> list[Any]:
        return list(executor.map(lambda p: _sdk_call(sdk, p), prompts))

    def close() -> None:
        executor.shutdown()
        sdk.close()

    return Client(run, close)


def _make_ours(url: str, n: int, pool: int) -> Client:
    from rlm import AsyncOpenAIClient
    from rlm.loop import run_sync

    client = AsyncOpenAIClient(
        model=MODEL, api_key=API_KEY, base_url=url, max_concurrency=max(1, n)
    )

    def run(prompts: list[str]) -> list[Any]:
        return run_sync(client.completion_batch(prompts, return_exceptions=True))

    return Client(run, client.close_sync, lambda: {"retries": client.usage.retries})


def _make_bare(url: str, n: int, pool: int) -> Client:
    import aiohttp

    loop = asyncio.new_event_loop()
    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    session: aiohttp.ClientSession | None = None

    async def one(s: aiohttp.ClientSession, prompt: str) -> Any:
        try:
            async with s.post(endpoint, data=json.dumps(_body(prompt)).encode(),
                              headers=headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    return RuntimeError(f"HTTP {resp.status}: {raw[:100]!r}")
            return json.loads(raw)["choices"][0]["message"]["content"]
        except Exception as exc:  # noqa: BLE001 - counted as an error by the caller
            return exc

    async def batch(prompts: list[str]) -> list[Any]:
        nonlocal session
        if session is None:  # created inside the first (cold) run, as ours is
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(1, n)),
                timeout=aiohttp.ClientTimeout(total=120),
            )
        return await asyncio.gather(*(one(session, p) for p in prompts))

    def run(prompts: list[str]) -> list[Any]:
        return loop.run_until_complete(batch(prompts))

    def close() -> None:
        if session is not None:
            loop.run_until_complete(session.close())
        loop.close()

    return Client(run, close)


MAKERS = {
    "sequential": _make_sequential,
    "executor": _make_executor,
    "ours": _make_ours,
    "bare": _make_bare,
}


def _timed(run: Runner, prompts: list[str], url: str) -> dict[str, Any]:
    from rlm.testing import fetch_stats, reset_stats

    gc.collect()
    reset_stats(url)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(prompts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = fetch_stats(url)
    failures = [o for o in out if isinstance(o, BaseException)]
    wrong = sum(1 for i, o in enumerate(out) if not isinstance(o, BaseException) and o != str(i))
    sample = f"{type(failures[0]).__name__}: {failures[0]}"[:200] if failures else None
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_ms_per_query": cpu * 1000 / len(prompts),
        "errors": len(failures) + wrong + (len(prompts) - len(out)),
        "error_sample": sample,
        "peak_in_flight": stats["peak_in_flight"],
        "server_requests": stats["requests"],
        "new_connections": max(0, stats["connections"] - 1),  # minus the /stats request
    }


def worker(spec: dict[str, Any]) -> None:
    """Measure one client kind for one N in this (fresh) process and emit the result."""
    raise_fd_limit()
    kind, n, url, pool = spec["kind"], spec["n"], spec["url"], spec["pool"]
    prompts = [f"ECHO {i}" for i in range(n)]
    client = MAKERS[kind](url, n, pool)
    run = client.run
    result: dict[str, Any] = {"cold": None, "runs": []}
    try:
        if kind in ("ours", "bare"):
            # The first batch opens every connection: reported on its own as the cold run.
            result["cold"] = _timed(run, prompts, url)
        else:
            # Warm-up: open the connections this kind will use (1, or one per thread).
            run(prompts[: 1 if kind == "sequential" else min(n, pool)])
        for _ in range(spec["runs"]):
            result["runs"].append(_timed(run, prompts, url))
        result.update(client.extras())
    finally:
        client.close()
    emit_result(result)


# -- orchestrator side --------------------------------------------------------------


def _expected_run_s(kind: str, n: int, latency: float, pool: int) -> float:
    if kind == "sequential":
        return n * latency
    if kind == "executor":
        return math.ceil(n / pool) * latency
    return latency


def _spawn(spec: dict[str, Any], expected_s: float) -> dict[str, Any]:
    timeout = 120 + 4 * expected_s * (spec["runs"] + 1)
    return run_worker([sys.executable, __file__, "--worker", json.dumps(spec)], timeout)


def _summarise(
    kind: str, n: int, latency: float, results: list[dict[str, Any]], workers: int
) -> dict[str, Any]:
    """One table row from the results of one or more worker processes."""
    cell: dict[str, Any] = {"kind": kind, "n": n, "latency_s": latency, "workers": workers}
    failed = [r["failed"] for r in results if "failed" in r]
    results = [r for r in results if "failed" not in r]
    if failed:
        cell["worker_failures"] = failed
    timed = [run for r in results for run in r["runs"]]
    cell["runs"] = len(timed)
    if not timed:
        cell["failed"] = failed[0] if failed else "no runs"
        return cell
    colds = [r["cold"] for r in results if r.get("cold")]
    cell.update(
        wall_s=median([r["wall_s"] for r in timed]),
        wall_min_s=min(r["wall_s"] for r in timed),
        wall_max_s=max(r["wall_s"] for r in timed),
        cpu_ms_per_query=median([r["cpu_ms_per_query"] for r in timed]),
        errors=sum(r["errors"] for r in timed),
        peak_in_flight=max(r["peak_in_flight"] for r in timed),
        cold=None,
        raw_runs=timed,
    )
    if colds:
        cell["cold"] = {
            "wall_s": median([c["wall_s"] for c in colds]),
            "cpu_ms_per_query": median([c["cpu_ms_per_query"] for c in colds]),
            "errors": sum(c["errors"] for c in colds),
            "runs": colds,
        }
    if any("retries" in r for r in results):
        cell["retries"] = sum(r.get("retries", 0) for r in results)
    samples = [r["error_sample"] for r in timed + colds if r.get("error_sample")]
    if samples:
        cell["error_sample"] = samples[0]
    return cell


def measure_sync(
    kind: str, n: int, latency: float, url: str, runs: int, pool: int
) -> dict[str, Any]:
    """A sync-SDK row: one fresh worker process, a warm-up, then ``runs`` timed runs."""
    expected = _expected_run_s(kind, n, latency, pool)
    if expected > SLOW_RUN_S:
        runs = 1
    spec = {"kind": kind, "n": n, "latency": latency, "url": url, "runs": runs, "pool": pool}
    cell = _summarise(kind, n, latency, [_spawn(spec, expected)], 1)
    if kind == "executor":
        cell["pool_size"] = pool
    return cell


def measure_async(
    kinds: Sequence[str], n: int, latency: float, url: str, runs: int, pool: int
) -> list[dict[str, Any]]:
    """Async rows (ours, bare): ``runs`` fresh workers per kind, each a cold then a warm run.

    The kinds' workers alternate (and alternate which goes first), so a noisy spell on
    this shared machine lands on both rather than on one.
    """
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for i in range(runs):
        order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
        for kind in order:
            _progress(f"  {kind} N={n} L={latency:g}s worker {i + 1}/{runs}")
            spec = {"kind": kind, "n": n, "latency": latency, "url": url, "runs": 1,
                    "pool": pool}
            results[kind].append(_spawn(spec, latency))
    return [_summarise(k, n, latency, results[k], runs) for k in kinds]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _grid(quick: bool, ns: list[int] | None, latencies: list[float] | None
          ) -> list[tuple[float, list[int]]]:
    if ns or latencies:
        full = dict(_grid(quick, None, None))
        return [(lat, ns or full.get(lat, [4, 100, 1000, 10000]))
                for lat in (latencies or list(full))]
    if quick:
        return [(0.5, [4, 100, 1000]), (1.0, [10000])]
    return [(0.5, [4, 100, 1000, 10000]), (1.0, [4, 100, 1000, 10000])]


def _kinds_for(n: int, quick: bool) -> list[str | tuple[str, str]]:
    """The sync-SDK kinds to run for this N; a (kind, reason) pair marks a skipped row."""
    kinds: list[str | tuple[str, str]] = []
    seq_max = 4 if quick else SEQUENTIAL_MAX_N
    kinds.append("sequential" if n <= seq_max else ("sequential", "skipped: N x L"))
    if quick and n > 100:
        kinds.append(("executor", "skipped in --quick"))
    else:
        kinds.append("executor")
    return kinds


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from rlm.testing import spawn_fake_server

    fd = raise_fd_limit()
    runs = 1 if args.quick else args.runs
    pool = args.pool
    data: dict[str, Any] = {
        "benchmark": "fanout",
        "machine": machine_info(),
        "config": {
            "quick": args.quick,
            "runs_per_cell": runs,
            "slow_row_threshold_s": SLOW_RUN_S,
            "executor_pool_size": pool,
            "sequential_max_n": 4 if args.quick else SEQUENTIAL_MAX_N,
            "fake_server": "rlm.testing.spawn_fake_server (own process)",
            "nofile_limit": list(fd),
            "grid": _grid(args.quick, args.ns, args.latencies),
            "kinds": list(args.kinds or KINDS),
            "model": MODEL,
        },
        "reference": [],
        "cells": [],
    }

    if not args.no_reference:
        ref_n, ref_l = REFERENCE["n"], REFERENCE["latency"]
        with spawn_fake_server(ref_l) as url:
            _progress(f"reference experiment: N={ref_n} L={ref_l:g}s")
            cells = [measure_sync(k, ref_n, ref_l, url, runs, pool)
                     for k in ("sequential", "executor")]
            cells += measure_async(["ours"], ref_n, ref_l, url, runs, pool)
        for cell in cells:
            cell["reference_s"] = REFERENCE[cell["kind"]]
        data["reference"] = cells

    kinds = set(args.kinds or KINDS)
    for latency, ns in _grid(args.quick, args.ns, args.latencies):
        with spawn_fake_server(latency) as url:
            for n in ns:
                for entry in _kinds_for(n, args.quick):
                    if (entry[0] if isinstance(entry, tuple) else entry) not in kinds:
                        continue
                    if isinstance(entry, tuple):
                        kind, reason = entry
                        cell = {"kind": kind, "n": n, "latency_s": latency, "skipped": reason}
                        if kind == "sequential":
                            cell["skipped"] = f"skipped: N x L = {n * latency:,.0f} s"
                            cell["extrapolated_s"] = _extrapolate(data["cells"], n, latency)
                        data["cells"].append(cell)
                        continue
                    if entry in ("sequential", "executor"):
                        _progress(f"  {entry} N={n} L={latency:g}s")
                        data["cells"].append(measure_sync(entry, n, latency, url, runs, pool))
                async_kinds = [k for k in ("ours", "bare") if k in kinds]
                if async_kinds:
                    data["cells"] += measure_async(async_kinds, n, latency, url, runs, pool)
    _add_ratios(data["cells"])
    data["targets"] = _targets(data["cells"], args.quick)
    return data


def _extrapolate(cells: list[dict[str, Any]], n: int, latency: float) -> float:
    """N x the per-query time of the largest measured sequential row at this latency."""
    measured = [
        c for c in cells
        if c["kind"] == "sequential" and c["latency_s"] == latency and c.get("wall_s")
    ]
    if not measured:
        return n * latency
    biggest = max(measured, key=lambda c: c["n"])
    return biggest["wall_s"] / biggest["n"] * n


def _floor(cells: list[dict[str, Any]], n: int, latency: float) -> dict[str, Any] | None:
    for c in cells:
        if c["kind"] == "bare" and c["n"] == n and c["latency_s"] == latency and c.get("wall_s"):
            return c
    return None


def _add_ratios(cells: list[dict[str, Any]]) -> None:
    for c in cells:
        floor = _floor(cells, c["n"], c["latency_s"])
        if floor is None:
            continue
        wall = c.get("wall_s") or c.get("extrapolated_s")
        if wall:
            c["ratio_to_floor"] = wall / floor["wall_s"]
        if c.get("cold") and floor.get("cold"):
            c["cold_ratio_to_floor"] = c["cold"]["wall_s"] / floor["cold"]["wall_s"]


def _find(cells: list[dict[str, Any]], kind: str, n: int, latency: float) -> dict[str, Any] | None:
    for c in cells:
        if c["kind"] == kind and c["n"] == n and c["latency_s"] == latency:
            return c
    return None


def _targets(cells: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    ours, bare = _find(cells, "ours", 1000, 0.5), _find(cells, "bare", 1000, 0.5)
    target: dict[str, Any] = {"name": "N=1000, L=0.5 s: ours within 1.5x of the bare floor"}
    if ours and bare and ours.get("wall_s") and bare.get("wall_s"):
        ratio = ours["wall_s"] / bare["wall_s"]
        cold = ours.get("cold_ratio_to_floor")
        target.update(
            measured=f"{ours['wall_s']:.2f} s vs floor {bare['wall_s']:.2f} s = {ratio:.2f}x"
            + (f" (cold first run {cold:.2f}x)" if cold else ""),
            value=ratio,
            passed=ratio <= 1.5,
        )
    else:
        target.update(measured="not measured", passed=None)
    out.append(target)

    ours = _find(cells, "ours", 10000, 1.0)
    target = {"name": "N=10,000, L=1 s: ours under 7 s with 0 errors"}
    if ours and ours.get("wall_s") is not None:
        cold = ours["cold"]
        target.update(
            measured=f"{ours['wall_s']:.2f} s, {ours['errors']} errors "
            f"(cold first run {cold['wall_s']:.2f} s, {cold['errors']} errors)",
            value=ours["wall_s"],
            passed=ours["wall_s"] < 7.0 and ours["errors"] == 0,
            cold_passed=cold["wall_s"] < 7.0 and cold["errors"] == 0,
        )
    else:
        target.update(measured="not measured", passed=None)
    out.append(target)

    rows = [c for c in cells if c["kind"] == "ours" and c["n"] >= 1000 and c.get("wall_s")]
    target = {"name": "client CPU per sub-query under 0.5 ms (ours, N >= 1000)"}
    if rows:
        worst = max(rows, key=lambda c: c["cpu_ms_per_query"])
        target.update(
            measured=", ".join(
                f"N={c['n']} L={c['latency_s']:g}: {c['cpu_ms_per_query']:.3f} ms"
                for c in rows
            ) + f"; worst {worst['cpu_ms_per_query']:.3f} ms",
            value=worst["cpu_ms_per_query"],
            passed=worst["cpu_ms_per_query"] < 0.5,
        )
    else:
        target.update(measured="not measured", passed=None)
    out.append(target)
    return out


# -- printing ----------------------------------------------------------------------


def _verdict(passed: bool | None) -> str:
    return {True: "[green]PASS[/]", False: "[red]MISSED[/]", None: "[yellow]n/a[/]"}[passed]


def _label(c: dict[str, Any], pool: int) -> str:
    return f"executor ({pool} thr)" if c["kind"] == "executor" else SHORT[c["kind"]]


def print_report(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    cfg, machine = data["config"], data["machine"]
    pool = cfg["executor_pool_size"]
    load = ", ".join(f"{x:.2f}" for x in machine["loadavg_at_start"] or [])
    console.print(
        f"[bold]rlm fan-out benchmark[/]  {machine['date']}  {machine['cpu_count']} CPUs  "
        f"Python {machine['python']}  commit {machine['commit']}  load {load}"
        + ("  [yellow](--quick)[/]" if cfg["quick"] else "")
    )

    ref = Table(
        title=f"Reference experiment: {REFERENCE['n']} parallel queries at "
        f"{REFERENCE['latency']:g} s latency (fake server) vs the gpt-4o-mini reference run",
        title_justify="left",
    )
    for col in ("client", "wall (s)", "reference (s)", "CPU ms/query", "peak in-flight",
                "errors"):
        ref.add_column(col, justify="left" if col == "client" else "right")
    for c in data["reference"]:
        label = _label(c, pool)
        if "failed" in c:
            ref.add_row(label, "failed", fmt_s(c["reference_s"], 1), c["failed"][:60], "", "")
            continue
        ref.add_row(label, fmt_s(c["wall_s"]), fmt_s(c["reference_s"], 1),
                    f"{c['cpu_ms_per_query']:.2f}", str(c["peak_in_flight"]), str(c["errors"]))
    if data["reference"]:
        console.print(ref)

    main = Table(
        title="Fan-out: N sub-queries at latency L (wall = median of warm runs; "
        "cold = first batch of a fresh process, opening every connection)",
        title_justify="left",
    )
    for col in ("N", "L", "client", "runs", "wall (s)", "x floor", "cold (s)", "cold x fl",
                "CPU ms/q", "errors", "peak infl", "note"):
        main.add_column(col, justify="left" if col in ("client", "note") else "right")
    previous: tuple[int, float] | None = None
    for c in data["cells"]:
        key = (c["n"], c["latency_s"])
        if previous is not None and key != previous:
            main.add_section()
        previous = key
        head = [f"{c['n']:,}", f"{c['latency_s']:g}", _label(c, pool)]
        if "skipped" in c:
            note = c["skipped"]
            ratio = "-"
            if "extrapolated_s" in c:
                note += f", est. {c['extrapolated_s']:,.0f} s"
                ratio = f"~{c['ratio_to_floor']:,.0f}" if c.get("ratio_to_floor") else "-"
            main.add_row(*head, "0", "-", ratio, "-", "-", "-", "-", "-", note)
            continue
        if "failed" in c:
            main.add_row(*head, str(c["runs"]), "failed", *["-"] * 6, c["failed"][:60])
            continue
        cold = c.get("cold")
        notes = []
        if c["runs"] > 1:
            notes.append(f"{c['wall_min_s']:.2f}-{c['wall_max_s']:.2f}")
        if c.get("retries"):
            notes.append(f"{c['retries']} retries")
        if c.get("error_sample"):
            notes.append(c["error_sample"][:40])
        main.add_row(
            *head,
            str(c["runs"]),
            fmt_s(c["wall_s"]),
            f"{c['ratio_to_floor']:.2f}" if c.get("ratio_to_floor") else "-",
            fmt_s(cold["wall_s"]) if cold else "-",
            f"{c['cold_ratio_to_floor']:.2f}" if c.get("cold_ratio_to_floor") else "-",
            f"{c['cpu_ms_per_query']:.3f}",
            str(c["errors"]) + (f" (cold {cold['errors']})" if cold and cold["errors"] else ""),
            f"{c['peak_in_flight']:,}",
            "; ".join(notes),
        )
    console.print(main)
    console.print(
        f"sequential = the openai SDK's sync client, one call after another (run for N <= "
        f"{cfg['sequential_max_n']}; above, skipped and estimated from the largest measured "
        f"N); executor = the same sync calls on ThreadPoolExecutor(max_workers={pool}); "
        "ours = AsyncOpenAIClient.completion_batch, max_concurrency=N, via rlm.loop.run_sync; "
        "floor = one aiohttp ClientSession, TCPConnector(limit=N), same bodies and "
        "Authorization header. Each client runs in its own fresh process; ours and bare "
        "in alternating workers (cold + 1 warm run each). CPU ms/q = process_time of the "
        "client's process (all threads) / N over warm runs; note = warm min-max (s)."
    )
    console.print("[bold]Targets[/] (this machine, fake server in its own process)")
    for t in data["targets"]:
        extra = ""
        if t.get("cold_passed") is not None and t.get("passed") is not None:
            extra = f"  [cold first run: {_verdict(t['cold_passed'])}]"
        console.print(f"  {_verdict(t['passed'])}  {t['name']}: {t['measured']}{extra}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 2 minutes)")
    parser.add_argument("--runs", type=int, default=3, help="warm runs per cell (default 3)")
    parser.add_argument("--pool", type=int, default=32, help="executor threads (default 32)")
    parser.add_argument(
        "--out", help="file under benchmarks/results/ (fanout.json; fanout-quick.json with --quick)"
    )
    parser.add_argument("--ns", type=int, nargs="+", help="only these N (e.g. --ns 10000)")
    parser.add_argument("--latencies", type=float, nargs="+", help="only these latencies (s)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="only these client kinds")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the 4-query reference table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    data = run_all(args)
    print_report(data)
    default = "fanout-quick.json" if args.quick else "fanout.json"
    if args.ns or args.latencies or args.kinds or args.no_reference:
        default = "fanout-partial.json"  # never overwrite a full run with a partial one
    path = write_json(args.out or default, data)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
