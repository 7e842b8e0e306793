"""Flood benchmark: one env floods the host with sub-queries; does the host and its neighbour hold?

    python benchmarks/flood.py            # full run (a few minutes here)
    python benchmarks/flood.py --quick    # smaller floods

Everything runs in this process (the host) except the fake OpenAI server (its own
process, fixed latency) and the sandbox workers. Each scenario runs one *flood* cell
in env A while env B (its own client, same engine loop) makes sequential single
sub-queries, and this process's RSS is sampled every 20 ms:

- ``million``: ``llm_query_batch(['x'] * 10**6)``, repeated (refused by max_batch_items);
- ``forty_mb``: five ``llm_query('x' * 40 MB)`` (refused by max_prompt_bytes);
- ``big_batch``: one batch of N small prompts (allowed; fed in as slots free up);
- ``big_prompts``: a batch of 4 MB prompts (the largest allowed) worth 256 MB;
- ``singles``: 10,000 concurrent ``llm_query_async`` (past 2 x max_in_flight refused).

Reported per scenario and sandbox: host RSS growth (peak minus the level before the
flood), env B's median sub-query latency against its median with no flood (ratio),
and whether the flood cell's error names the option. Then kill timing under load: a
cell stuck in one C call (``10**10**9``) with a 2 s timeout in env C while
``big_batch`` floods env A; lateness is when the cell returned minus when its kill was
due (timeout + KILL_GRACE_S): when the kill landed (the worker seen dead) and when the
cell returned.

Targets (issue 9): RSS growth <= 256 MB, latency ratio <= 2, kill lateness <= 1 s.
The machine is shared (2 cores, other work running): numbers are medians of one run
each and say so. Results: benchmarks/results/flood.json.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from _common import machine_info, write_json

from rlm import AsyncOpenAIClient, REPLEnv
from rlm.loop import run_sync
from rlm.sandbox.process import KILL_GRACE_S
from rlm.testing import spawn_fake_server

LATENCY = 0.1
MB = 1 << 20


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples this process's RSS every 20 ms on a thread; ``peak`` since start."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def neighbour_latencies(env: REPLEnv, stop: threading.Event, out: list[float]) -> None:
    """Env B's sub-query latency, measured inside its cell, until ``stop`` is set."""
    while not stop.is_set():
        r = env.execute(
            "import time\nt = time.perf_counter()\nllm_query('ECHO ok')\n"
            "print(time.perf_counter() - t)"
        )
        if r.error is None:
            out.append(float(r.stdout))


def scenarios(quick: bool) -> dict[str, str]:
    n_batch = 5_000 if quick else 10_000
    return {
        "million": (
            "errors = []\n"
            f"for _ in range({3 if quick else 10}):\n"
            "    try:\n"
            "        llm_query_batch(['x'] * 10**6)\n"
            "    except Exception as exc:\n"
            "        errors.append(str(exc))\n"
            "print(errors[0])\n"
        ),
        "forty_mb": (
            "errors = []\n"
            "big = 'x' * (40 << 20)\n"
            "for _ in range(5):\n"
            "    try:\n"
            "        llm_query(big)\n"
            "    except Exception as exc:\n"
            "        errors.append(str(exc))\n"
            "print(errors[0])\n"
        ),
        "big_batch": (
            f"rs = llm_query_batch([f'ECHO {{i}}' for i in range({n_batch})])\n"
            "print(len(rs), rs[-1])\n"
        ),
        "big_prompts": (
            "p = 'y' * ((4 << 20) - 64)\n"
            f"rs = llm_query_batch([p] * {16 if quick else 64})\n"
            "print(len(rs))\n"
        ),
        "singles": (
            "import asyncio\n"
            "out = await asyncio.gather(*[llm_query_async(f'ECHO {i}') for i in range(10000)],\n"
            "                           return_exceptions=True)\n"
            "bad = [str(o) for o in out if not isinstance(o, str)]\n"
            "print(len(out) - len(bad), 'ok;', len(bad), 'refused:', bad[0] if bad else '')\n"
        ),
    }


def run_scenario(flood: REPLEnv, neighbour: REPLEnv, code: str, baseline: float) -> dict[str, Any]:
    stop = threading.Event()
    latencies: list[float] = []
    watcher = threading.Thread(target=neighbour_latencies, args=(neighbour, stop, latencies))
    before = rss_bytes()
    with RssSampler() as rss:
        watcher.start()
        started = time.perf_counter()
        result = flood.execute(code)
        elapsed = time.perf_counter() - started
        stop.set()
        watcher.join()
    med = statistics.median(latencies) if latencies else None
    text = (result.error or result.stdout).strip().splitlines()
    return {
        "flood_s": round(elapsed, 3),
        "flood_said": text[-1][:240] if text else "",
        "flood_ok": result.error is None,
        "host_rss_growth_mb": round((rss.peak - before) / MB, 1),
        "neighbour_calls": len(latencies),
        "neighbour_median_s": None if med is None else round(med, 4),
        "neighbour_latency_ratio": None if med is None else round(med / baseline, 2),
    }


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_timing(url: str, quick: bool) -> dict[str, Any]:
    """A C-level cell's kill under a big_batch flood from another env.

    ``landed``: when the worker's init was seen dead (polled every 2 ms from a thread),
    ``returned``: when ``execute`` returned; both against the moment the kill was due.
    """
    timeout = 2.0
    flood_client = AsyncOpenAIClient(model="m", api_key="sk-bench", base_url=url, max_concurrency=256)
    flood = REPLEnv("ctx", client=flood_client, sandbox="process", timeout=600)
    victim = REPLEnv("ctx", sandbox="process", timeout=timeout)
    code = scenarios(quick)["big_batch"]
    landed: list[float] = []
    returned: list[float] = []
    try:
        thread = threading.Thread(target=flood.execute, args=(code,))
        thread.start()
        time.sleep(1.0)
        for _ in range(3 if quick else 5):
            victim.execute("1")  # the next worker is up (a kill restarts it in the background)
            pid = victim.executor._res.pid  # type: ignore[attr-defined]  # the init to watch
            seen: list[float] = []

            def watch(pid: int = pid, seen: list[float] = seen) -> None:
                while not _dead(pid):
                    time.sleep(0.002)
                seen.append(time.perf_counter())

            watcher = threading.Thread(target=watch)
            started = time.perf_counter()
            watcher.start()
            r = victim.execute("x = 10**10**9")
            returned.append(time.perf_counter() - started)
            watcher.join()
            landed.append(seen[0] - started)
            assert r.error is not None and "killed" in r.error, r.error
        thread.join()
    finally:
        flood.close()
        victim.close()
        run_sync(flood_client.close())
    due = timeout + KILL_GRACE_S
    return {
        "timeout_s": timeout,
        "kill_grace_s": KILL_GRACE_S,
        "kill_landed_after_s": [round(x, 3) for x in landed],
        "returned_after_s": [round(x, 3) for x in returned],
        "median_kill_late_s": round(statistics.median(landed) - due, 3),
        "max_kill_late_s": round(max(landed) - due, 3),
        "median_return_late_s": round(statistics.median(returned) - due, 3),
        "max_return_late_s": round(max(returned) - due, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated scenarios (and 'kill')")
    parser.add_argument("--sandboxes", default="process,local")
    args = parser.parse_args()
    only = {name for name in args.only.split(",") if name}
    results: dict[str, Any] = {
        "machine": machine_info(),
        "note": (
            "shared 2-core machine, one run per scenario; host = this process (RSS), fake "
            f"server in its own process at {LATENCY} s latency; env A and env B have their "
            "own clients (max_concurrency=256) on the one engine loop; default caps"
        ),
        "targets": {"host_rss_growth_mb": 256, "neighbour_latency_ratio": 2.0, "kill_late_s": 1.0},
        "scenarios": {},
    }
    with spawn_fake_server(latency=LATENCY) as url:
        clients = [
            AsyncOpenAIClient(model="m", api_key="sk-bench", base_url=url, max_concurrency=256)
            for _ in range(2)
        ]
        try:
            for sandbox in args.sandboxes.split(","):
                flood = REPLEnv("ctx", client=clients[0], sandbox=sandbox, timeout=600)
                neighbour = REPLEnv("ctx", client=clients[1], sandbox=sandbox, timeout=600)
                stop = threading.Event()
                calm: list[float] = []
                timer = threading.Timer(3.0, stop.set)
                timer.start()
                neighbour_latencies(neighbour, stop, calm)
                baseline = statistics.median(calm)
                rows: dict[str, Any] = {"neighbour_baseline_s": round(baseline, 4)}
                for name, code in scenarios(args.quick).items():
                    if only and name not in only:
                        continue
                    rows[name] = run_scenario(flood, neighbour, code, baseline)
                    print(sandbox, name, rows[name], flush=True)
                results["scenarios"][sandbox] = rows
                flood.close()
                neighbour.close()
            if not only or "kill" in only:
                results["kill_timing_under_flood"] = kill_timing(url, args.quick)
                print("kill timing", results["kill_timing_under_flood"], flush=True)
        finally:
            for client in clients:
                run_sync(client.close())
    name = "flood-quick.json" if args.quick or only else "flood.json"
    path = write_json(name, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
