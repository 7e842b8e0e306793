"""The fake server in its own process: start it, wait for it, read its counters.

Holds :func:`spawn_fake_server` (runs ``python -m rlm.testing`` and yields its URL once
it prints ``READY``) and :func:`fetch_stats` / :func:`reset_stats`, which reach a fake
server in any process over HTTP with the standard library only. It must not hold the
server itself or its command-line options (``cli``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import selectors
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["fetch_stats", "reset_stats", "spawn_fake_server"]


@contextlib.contextmanager
def spawn_fake_server(
    latency: float | tuple[float, float] = 0.0,
    *,
    port: int = 0,
    startup_timeout: float = 30.0,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run the fake server in its own process and yield its base URL
    (``http://127.0.0.1:PORT/v1``); benchmarks use it so the server's CPU does not compete
    with the client's inside one interpreter. ``extra_args`` pass on to
    ``python -m rlm.testing`` (``--fault-rate``, ``--rate-limit``, ``--limit``,
    ``--responder``...). The process is terminated (then killed if it lingers) on exit;
    if it fails to start, the error carries its stderr.
    """
    cmd = [sys.executable, "-m", "rlm.testing", "--port", str(port), *extra_args]
    if isinstance(latency, tuple):
        cmd += ["--latency", repr(float(latency[0])), "--latency-max", repr(float(latency[1]))]
    else:
        cmd += ["--latency", repr(float(latency))]
    env = dict(os.environ)
    # Make `rlm` importable in the child even when it is not installed.
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=env)
        assert proc.stdout is not None
        try:
            line = _read_line(proc, startup_timeout)
            if not line.startswith("READY "):
                errors.seek(0)
                detail = errors.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"fake server failed to start ({line!r}):\n{detail}")
            yield line.split(" ", 1)[1]
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The child's first stdout line, or "" if it exits or stays silent past ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline().decode(errors="replace").strip()


def _stats_request(base_url: str, method: str, path: str) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(base_url)
    # http.client, not urllib.request: proxy settings in the environment must not
    # reroute a loopback request.
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path} answered {response.status}: {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result
    finally:
        conn.close()


def fetch_stats(base_url: str) -> dict[str, Any]:
    """The counters of a fake server (in any process), read over HTTP from ``/stats``: the
    same dict as :meth:`FakeLLMServer.stats`."""
    return _stats_request(base_url, "GET", "/stats")


def reset_stats(base_url: str) -> None:
    """Reset the counters of a fake server (in any process) via ``POST /stats/reset``."""
    _stats_request(base_url, "POST", "/stats/reset")
