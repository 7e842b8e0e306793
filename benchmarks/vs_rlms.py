"""rlm vs the official ``rlms`` package: N=1000 sub-queries at 0.5 s from REPL code.

    python benchmarks/vs_rlms.py            # 3 fresh processes per fast row
    python benchmarks/vs_rlms.py --quick    # 1 process per row

``rlms`` (PyPI) also installs a top-level ``rlm`` package, so it lives in its own venv,
benchmarks/.venv-rlms, created on demand (``python3 -m venv`` + ``pip install rlms``);
if that fails the benchmark prints "skipped: could not install rlms" and exits 0.

How rlms 0.1.3 runs a batch (read from its installed source, rlm/core/lm_handler.py and
rlm/environments/local_repl.py): REPL code calls ``llm_query_batched(prompts)``, which
sends the prompts over a local socket to an ``LMHandler`` (a ThreadingTCPServer); the
handler thread runs ``asyncio.run(gather(...))`` for each batch, bounded by
``asyncio.Semaphore(batch_max_concurrent)`` (default 16; ``RLM`` never passes it, so
only constructing ``LMHandler(client, batch_max_concurrent=N)`` yourself raises it),
calling ``openai.AsyncOpenAI.chat.completions.create`` on the SDK's default transport.
This script drives exactly that, in a subprocess on the rlms venv's python, against our
fake server (own process) with a dummy key. Ours is ``llm_query_batch`` in REPL code run
by ``rlm.REPLEnv.execute`` over ``AsyncOpenAIClient``. Every prompt is ``"ECHO i"`` and
the fake server answers ``"i"``, so any other answer is counted as an error.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    emit_result,
    fmt_s,
    machine_info,
    median,
    raise_fd_limit,
    reset_server_stats,
    run_worker,
    server_stats,
    write_json,
)

MODEL = "fake-model"
API_KEY = "sk-fake-benchmark"
N = 1000
LATENCY = 0.5
PROBE_N = 20
RLMS_REQUIREMENT = "rlms==0.1.3"
RLMS_VENV = ROOT / "benchmarks" / ".venv-rlms"
SLOW_BATCH_S = 30.0  # rows slower than this per batch run in one process, not k


def _code(func: str, n: int) -> str:
    return f"r = {func}([f'ECHO {{i}}' for i in range({n})])"


def _count_errors(results: Any, n: int) -> tuple[int, str | None]:
    if not isinstance(results, list):
        return n, f"no result list (got {type(results).__name__})"
    bad = [(i, r) for i, r in enumerate(results) if r != str(i)]
    bad_total = len(bad) + max(0, n - len(results))
    sample = str(bad[0][1])[:200] if bad else None
    return bad_total, sample


def _timed_batch(url: str, n: int, run: Callable[[], tuple[Any, str | None]]) -> dict[str, Any]:
    """One batch: wall, CPU of this process (all threads), errors, server peak in-flight."""
    reset_server_stats(url)
    t0, c0 = time.perf_counter(), time.process_time()
    results, failure = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = server_stats(url)
    errors, sample = _count_errors(results, n)
    return {
        "wall_s": wall,
        "cpu_ms_per_query": cpu * 1000 / n,
        "errors": errors,
        "error_sample": failure or sample,
        "peak_in_flight": stats["peak_in_flight"],
        "server_requests": stats["requests"],
    }


# -- rlms side (runs on the rlms venv's python, where `rlm` is the rlms package) -------


def rlms_worker(spec: dict[str, Any]) -> None:
    """Drive rlms's LocalREPL + LMHandler the way a user's REPL code would; emit results."""
    import asyncio
    import inspect
    from importlib import metadata

    from rlm.clients.openai import OpenAIClient  # the rlms package, in its own venv
    from rlm.core.lm_handler import LMHandler
    from rlm.environments.local_repl import LocalREPL

    raise_fd_limit()
    url, n, concurrency = spec["url"], spec["n"], spec["concurrency"]
    default = inspect.signature(LMHandler.__init__).parameters["batch_max_concurrent"].default

    def make() -> tuple[Any, Any]:
        client = OpenAIClient(api_key=API_KEY, model_name=MODEL, base_url=url)
        handler = (
            LMHandler(client) if concurrency is None
            else LMHandler(client, batch_max_concurrent=concurrency)
        )
        handler.start()
        # depth=1 is what RLM gives its environment (RLM depth + 1).
        env = LocalREPL(lm_handler_address=handler.address, context_payload="bench", depth=1)
        return handler, env

    def batch(env: Any, size: int) -> tuple[Any, str | None]:
        res = env.execute_code(_code("llm_query_batched", size))
        failure = res.stderr.strip()[-300:] or None
        return res.locals.get("r"), failure

    handler, env = make()
    batches = [_timed_batch(url, n, lambda: batch(env, n)) for _ in range(spec["batches"])]
    handler.stop()
    env.cleanup()

    # The same calls made from a coroutine, i.e. with an event loop running in the
    # calling thread (a Jupyter cell, a web handler): a fresh env, two batches.
    handler, env = make()

    async def inside_loop() -> list[dict[str, Any]]:
        return [_timed_batch(url, PROBE_N, lambda: batch(env, PROBE_N)) for _ in range(2)]

    try:
        probe: Any = asyncio.run(inside_loop())
    except Exception as exc:  # noqa: BLE001 - reported as the fact it is
        probe = f"{type(exc).__name__}: {exc}"
    handler.stop()
    env.cleanup()
    emit_result({
        "rlms_version": metadata.version("rlms"),
        "openai_version": metadata.version("openai"),
        "default_batch_max_concurrent": default,
        "batch_max_concurrent": default if concurrency is None else concurrency,
        "batches": batches,
        "inside_running_loop": probe,
    })


# -- our side (runs on this repo's venv) -----------------------------------------------


def ours_worker(spec: dict[str, Any]) -> None:
    """``llm_query_batch`` from REPL code in ``rlm.REPLEnv`` (else completion_batch)."""
    import asyncio

    import rlm
    from rlm import AsyncOpenAIClient
    from rlm.loop import run_sync

    raise_fd_limit()
    url, n, concurrency = spec["url"], spec["n"], spec["concurrency"]
    kwargs: dict[str, Any] = {} if concurrency is None else {"max_concurrency": concurrency}

    def make() -> tuple[Any, Any]:
        client = AsyncOpenAIClient(model=MODEL, api_key=API_KEY, base_url=url, **kwargs)
        env = None
        if hasattr(rlm, "REPLEnv"):
            # Ours defaults to the worker-process sandbox; these numbers are the in-process one.
            local = {"sandbox": "local"} if "sandbox" in inspect.signature(rlm.REPLEnv).parameters else {}
            env = rlm.REPLEnv(context="bench", client=client, timeout=600, **local)
        return client, env

    def batch(client: Any, env: Any, size: int) -> tuple[Any, str | None]:
        if env is None:
            prompts = [f"ECHO {i}" for i in range(size)]
            return run_sync(client.completion_batch(prompts, return_exceptions=True)), None
        res = env.execute(_code("llm_query_batch", size))
        if res.error:
            return None, res.error[-300:]
        return env.get("r"), None

    client, env = make()
    batches = [
        _timed_batch(url, n, lambda: batch(client, env, n)) for _ in range(spec["batches"])
    ]
    via = "REPLEnv.execute: llm_query_batch" if env is not None else "client.completion_batch"
    limit = client.max_concurrency
    if env is not None:
        env.close()
    client.close_sync()

    client, env = make()

    async def inside_loop() -> list[dict[str, Any]]:
        return [_timed_batch(url, PROBE_N, lambda: batch(client, env, PROBE_N)) for _ in range(2)]

    try:
        probe: Any = asyncio.run(inside_loop())
    except Exception as exc:  # noqa: BLE001 - reported as the fact it is
        probe = f"{type(exc).__name__}: {exc}"
    if env is not None:
        env.close()
    client.close_sync()
    emit_result({"via": via, "max_concurrency": limit, "batches": batches,
                 "inside_running_loop": probe})


# -- orchestrator --------------------------------------------------------------------


def ensure_rlms_venv(requirement: str) -> tuple[Path | None, str]:
    """The rlms venv's python (created and installed on first use), or None and why not."""
    python = RLMS_VENV / "bin" / "python"
    # -I: neither the current directory (this repo's own `rlm`) nor PYTHONPATH.
    check = [str(python), "-I", "-c", "import importlib.metadata as m, rlm.core.lm_handler, "
             "rlm.environments.local_repl; print(m.version('rlms'))"]

    def installed() -> str | None:
        if not python.exists():
            return None
        proc = subprocess.run(check, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    version = installed()
    pinned = requirement.partition("==")[2]
    if version and (not pinned or version == pinned):
        return python, f"rlms {version} already installed"
    base = shutil.which("python3") or sys.executable
    print(f"creating {os.path.relpath(RLMS_VENV, ROOT)} and installing {requirement} ...",
          file=sys.stderr, flush=True)
    try:
        subprocess.run([base, "-m", "venv", str(RLMS_VENV)], check=True, capture_output=True,
                       text=True, timeout=300)
        # Keep the venv out of git without touching the repo's .gitignore.
        (RLMS_VENV / ".gitignore").write_text("*\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", requirement],
                       check=True, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        return None, " ".join(str(detail).split())[-300:]
    version = installed()
    if version is None:
        return None, "installed, but rlm.core.lm_handler does not import"
    return python, f"rlms {version} installed now"


def _spawn(python: Path, mode: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the rlms venv must see its own `rlm`, not this repo's
    cmd = [str(python), str(Path(__file__).resolve()), mode, json.dumps(spec)]
    return run_worker(cmd, timeout, env=env)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _row(name: str, config: str, via: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise the workers of one row: batch 1 (first in a fresh process) and batch 2."""
    row: dict[str, Any] = {"name": name, "config": config, "via": via, "workers": len(results)}
    failed = [r["failed"] for r in results if "failed" in r]
    ok = [r for r in results if "failed" not in r]
    if failed:
        row["worker_failures"] = failed
    if not ok:
        row["failed"] = failed[0] if failed else "no result"
        return row
    for key in ("via", "max_concurrency", "batch_max_concurrent", "default_batch_max_concurrent",
                "rlms_version", "openai_version"):
        if key in ok[0]:
            row[key] = ok[0][key]
    for b in range(max(len(r["batches"]) for r in ok)):
        runs = [r["batches"][b] for r in ok if len(r["batches"]) > b]
        samples = [x["error_sample"] for x in runs if x.get("error_sample")]
        row[f"batch{b + 1}"] = {
            "wall_s": median([x["wall_s"] for x in runs]),
            "cpu_ms_per_query": median([x["cpu_ms_per_query"] for x in runs]),
            "errors": sum(x["errors"] for x in runs),
            "error_sample": samples[0] if samples else None,
            "peak_in_flight": max(x["peak_in_flight"] for x in runs),
            "runs": runs,
        }
    probe = ok[0].get("inside_running_loop")
    row["inside_running_loop"] = probe
    return row


def _bare_floor(url: str, workers: int) -> dict[str, Any]:
    """The bare aiohttp floor for the same N and latency, via fanout.py's worker."""
    fanout = Path(__file__).resolve().parent / "fanout.py"
    results = []
    for i in range(workers):
        _progress(f"  bare aiohttp floor, worker {i + 1}/{workers}")
        spec = {"kind": "bare", "n": N, "latency": LATENCY, "url": url, "runs": 1, "pool": 1}
        results.append(run_worker([sys.executable, str(fanout), "--worker", json.dumps(spec)],
                                  300))
    ok = [r for r in results if "failed" not in r]
    if not ok:
        return {"failed": results[0].get("failed", "no result")}
    return {
        "batch1_wall_s": median([r["cold"]["wall_s"] for r in ok]),
        "batch2_wall_s": median([r["runs"][0]["wall_s"] for r in ok]),
        "errors": sum(r["cold"]["errors"] + r["runs"][0]["errors"] for r in ok),
        "cpu_ms_per_query": median([r["runs"][0]["cpu_ms_per_query"] for r in ok]),
        "workers": len(ok),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from rlm.testing import spawn_fake_server

    raise_fd_limit()
    workers = 1 if args.quick else args.workers
    data: dict[str, Any] = {
        "benchmark": "vs_rlms",
        "machine": machine_info(),
        "config": {"n": N, "latency_s": LATENCY, "quick": args.quick, "workers_per_row": workers,
                   "rlms_requirement": args.rlms, "probe_n": PROBE_N,
                   "fake_server": "rlm.testing.spawn_fake_server (own process)"},
    }
    python, how = ensure_rlms_venv(args.rlms)
    data["rlms_venv"] = {"path": str(os.path.relpath(RLMS_VENV, ROOT)), "status": how}
    if python is None:
        data["skipped"] = f"could not install rlms: {how}"
        return data

    rows: list[dict[str, Any]] = []
    with spawn_fake_server(LATENCY) as url:
        plans: list[tuple[str, str, Path, str, int | None, int]] = [
            ("rlms", "defaults", python, "--rlms-worker", None, 1),
            ("rlms", f"uncapped: batch_max_concurrent={N}", python, "--rlms-worker",
             N, workers),
            ("ours", "defaults (max_concurrency=64)", Path(sys.executable), "--ours-worker",
             None, workers),
            ("ours", f"uncapped (max_concurrency={N})", Path(sys.executable), "--ours-worker",
             N, workers),
        ]
        for name, config, py, mode, concurrency, k in plans:
            batches = 1 if (args.quick and concurrency is None and name == "rlms") else 2
            results = []
            for i in range(k):
                _progress(f"  {name} {config}, worker {i + 1}/{k}")
                spec = {"url": url, "n": N, "concurrency": concurrency, "batches": batches}
                results.append(_spawn(py, mode, spec, 900))
            rows.append(_row(name, config, "", results))
        data["bare_floor"] = _bare_floor(url, workers)
    for row in rows:
        if row["name"] == "rlms" and "batch_max_concurrent" in row:
            default = row.get("default_batch_max_concurrent")
            if row["config"] == "defaults":
                row["config"] = f"defaults (batch_max_concurrent={default})"
            row["via"] = "LocalREPL.execute_code: llm_query_batched"
    data["rows"] = rows
    data["targets"] = _targets(rows, data["bare_floor"])
    return data


def _find(rows: list[dict[str, Any]], name: str, uncapped: bool) -> dict[str, Any] | None:
    for r in rows:
        if r["name"] == name and r["config"].startswith("uncapped") == uncapped and "batch1" in r:
            return r
    return None


def _targets(rows: list[dict[str, Any]], floor: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ours = _find(rows, "ours", True)
    rlms_unc, rlms_def = _find(rows, "rlms", True), _find(rows, "rlms", False)

    def speedup(name: str, theirs: dict[str, Any] | None, need: float | None) -> None:
        target: dict[str, Any] = {"name": name}
        if not ours or not theirs:
            target.update(measured="not measured", passed=None)
            out.append(target)
            return
        a, b = theirs["batch1"], ours["batch1"]
        ratio = a["wall_s"] / b["wall_s"]
        text = (f"first batch: rlms {a['wall_s']:.2f} s / ours {b['wall_s']:.2f} s = "
                f"{ratio:.1f}x")
        if "batch2" in theirs and "batch2" in ours:
            a2, b2 = theirs["batch2"], ours["batch2"]
            text += (f"; second batch: rlms {a2['wall_s']:.2f} s ({a2['errors']} errors) / "
                     f"ours {b2['wall_s']:.2f} s = {a2['wall_s'] / b2['wall_s']:.1f}x")
        target.update(measured=text, value=ratio,
                      passed=None if need is None else ratio >= need)
        out.append(target)

    speedup("ours at least 3x faster than rlms with its concurrency uncapped", rlms_unc, 3.0)
    speedup("ours vs rlms at its defaults (target: about 20x)", rlms_def, None)

    target: dict[str, Any] = {"name": "ours (REPL llm_query_batch) within 1.5x of bare aiohttp"}
    if ours and "batch2" in ours and "batch2_wall_s" in floor:
        ratio = ours["batch2"]["wall_s"] / floor["batch2_wall_s"]
        cold = ours["batch1"]["wall_s"] / floor["batch1_wall_s"]
        target.update(
            measured=f"warm {ours['batch2']['wall_s']:.2f} s vs floor "
            f"{floor['batch2_wall_s']:.2f} s = {ratio:.2f}x (first batch {cold:.2f}x)",
            value=ratio, passed=ratio <= 1.5)
    else:
        target.update(measured="not measured", passed=None)
    out.append(target)
    return out


def _probe_text(probe: Any) -> str:
    if isinstance(probe, str):
        return f"raised {probe}"
    if not isinstance(probe, list):
        return "-"
    parts = []
    for i, b in enumerate(probe, 1):
        state = "ok" if b["errors"] == 0 else f"{b['errors']}/{PROBE_N} errors"
        if b.get("error_sample") and b["errors"]:
            state += f" ({b['error_sample'][:70]})"
        parts.append(f"batch {i}: {state}")
    return "; ".join(parts)


def print_report(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    m = data["machine"]
    console.print(f"[bold]rlm vs rlms[/]  {m['date']}  {m['cpu_count']} CPUs  Python "
                  f"{m['python']}  commit {m['commit']}"
                  + ("  [yellow](--quick)[/]" if data["config"]["quick"] else ""))
    if "skipped" in data:
        console.print(f"[yellow]skipped: {data['skipped']}[/]")
        return
    table = Table(
        title=f"N={N} sub-queries at L={LATENCY:g} s from REPL code (fake server, own "
        "process); batch 1 = first batch in a fresh process, batch 2 = the next one "
        "from the same environment",
        title_justify="left",
    )
    for col in ("client", "config", "runs", "batch 1 (s)", "errors", "batch 2 (s)", "errors",
                "CPU ms/q", "peak infl", "rlms/ours b1"):
        table.add_column(col, justify="left" if col in ("client", "config") else "right")
    ours = _find(data["rows"], "ours", True)
    for r in data["rows"]:
        label = r["name"] + (f" {r['rlms_version']}" if r.get("rlms_version") else "")
        if "failed" in r:
            table.add_row(label, r["config"], "0", "failed", r["failed"][:50], *["-"] * 5)
            continue
        b1, b2 = r["batch1"], r.get("batch2")
        faster = "-"
        if r["name"] == "rlms" and ours:
            faster = f"{b1['wall_s'] / ours['batch1']['wall_s']:.1f}x"
        table.add_row(
            label, r["config"], str(r["workers"]),
            fmt_s(b1["wall_s"]), f"{b1['errors']}/{N * len(b1['runs'])}",
            fmt_s(b2["wall_s"]) if b2 else "-",
            f"{b2['errors']}/{N * len(b2['runs'])}" if b2 else "-",
            f"{(b2 or b1)['cpu_ms_per_query']:.3f}",
            f"{max(b1['peak_in_flight'], (b2 or b1)['peak_in_flight']):,}",
            faster,
        )
    floor = data.get("bare_floor", {})
    if "batch1_wall_s" in floor:
        table.add_section()
        table.add_row("bare aiohttp", "floor, TCPConnector(limit=N)", str(floor["workers"]),
                      fmt_s(floor["batch1_wall_s"]), "-", fmt_s(floor["batch2_wall_s"]),
                      f"{floor['errors']}/{2 * N * floor['workers']}",
                      f"{floor['cpu_ms_per_query']:.3f}", f"{N:,}", "-")
    console.print(table)
    vias = sorted({f"{r['name']}: {r['via']}" for r in data["rows"] if r.get("via")})
    console.print(
        "; ".join(vias) + ". rlms uncapped = LMHandler(client, batch_max_concurrent=N) built "
        "directly (RLM() never passes it). Times are medians over fresh processes; errors "
        "are summed over them (wrong answers / queries); CPU ms/q = process_time of the "
        "client process (all threads) / N, batch 2; rlms/ours b1 = rlms batch 1 / ours "
        "uncapped batch 1."
    )
    console.print(f"[bold]Called from inside a running event loop[/] (sync call from a "
                  f"coroutine, as in a Jupyter cell; fresh env, 2 batches of {PROBE_N}):")
    for r in data["rows"]:
        if "failed" not in r:
            console.print(f"  {r['name']} {r['config']}: {_probe_text(r.get('inside_running_loop'))}")
    console.print("  (rlms runs asyncio.run in its LMHandler's socket-server thread, not in "
                  "the calling thread, so the caller's running loop is not the one asyncio.run "
                  "sees)")
    for r in data["rows"]:
        b2 = r.get("batch2")
        if b2 and b2["errors"] and b2.get("error_sample"):
            console.print(f"  second batch error sample, {r['name']} {r['config']}: "
                          f"{b2['error_sample'][:200]}")
    console.print("[bold]Targets[/]")
    for t in data["targets"]:
        verdict = {True: "[green]PASS[/]", False: "[red]MISSED[/]", None: "[cyan]info[/]"}
        console.print(f"  {verdict[t['passed']]}  {t['name']}: {t['measured']}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--rlms-worker", "--ours-worker"):
        spec = json.loads(argv[1])
        (rlms_worker if argv[0] == "--rlms-worker" else ours_worker)(spec)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one process per row")
    parser.add_argument("--workers", type=int, default=3,
                        help="fresh processes per fast row (default 3)")
    parser.add_argument("--rlms", default=RLMS_REQUIREMENT, help="pip requirement for rlms")
    parser.add_argument("--out", help="file under benchmarks/results/ "
                        "(vs_rlms.json; vs_rlms-quick.json with --quick)")
    args = parser.parse_args(argv)
    data = run_all(args)
    print_report(data)
    path = write_json(args.out or ("vs_rlms-quick.json" if args.quick else "vs_rlms.json"), data)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
