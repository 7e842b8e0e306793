"""Small helpers shared by the benchmark scripts: medians, machine info, JSON, workers.

Benchmarks run each measured client in a fresh subprocess (``run_worker``) so one
client's imports, threads and garbage never show up in another's CPU time.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RESULT_PREFIX = "RESULT "


def median(values: Sequence[float]) -> float | None:
    """The median of ``values``, or None when there are none."""
    return statistics.median(values) if values else None


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; return (soft, hard).

    10,000 concurrent connections need more descriptors than the usual soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran: CPUs, Python, OS, load, commit, key packages."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "commit": commit,
        "packages": {d: _version(d) for d in ("openai", "aiohttp", "httpx2", "httpx")},
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` to benchmarks/results/<name> (pretty, stable key order)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def emit_result(data: dict[str, Any]) -> None:
    """Print a worker's result as the one line ``run_worker`` looks for."""
    print(RESULT_PREFIX + json.dumps(data), flush=True)


def run_worker(
    cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a worker subprocess and return the JSON it emitted with ``emit_result``.

    A worker that crashes, times out or prints no result gives ``{"failed": reason}``
    instead of raising, so one broken row does not lose the rest of the table.
    """
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"worker timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"failed": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def _stats_call(base_url: str, method: str, path: str) -> dict[str, int]:
    parts = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    try:
        conn.request(method, path)
        body = conn.getresponse().read()
        result: dict[str, int] = json.loads(body)
        return result
    finally:
        conn.close()


def server_stats(base_url: str) -> dict[str, int]:
    """The fake server's counters (GET /stats), stdlib only.

    Same endpoint as ``rlm.testing.fetch_stats``, but usable from a venv where ``rlm``
    is another package (the official ``rlms`` installs a top-level ``rlm`` too).
    """
    return _stats_call(base_url, "GET", "/stats")


def reset_server_stats(base_url: str) -> None:
    """Zero the fake server's counters (POST /stats/reset), stdlib only."""
    _stats_call(base_url, "POST", "/stats/reset")


def fmt_s(value: float | None, digits: int = 2) -> str:
    """Seconds for a table cell ("-" when missing)."""
    return "-" if value is None else f"{value:.{digits}f}"
