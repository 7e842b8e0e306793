"""Process-sandbox benchmark: worker start, cell overhead, fan-out from a worker, big contexts.

    python benchmarks/sandbox.py            # full run (about a minute here)
    python benchmarks/sandbox.py --quick    # fewer repetitions

Measured through the public ``REPLEnv`` API, in one process:

- worker start: ``REPLEnv(sandbox="process")`` until it can run a cell, median of 20,
  with the template process already running (its one-off start is reported apart);
- cell overhead: an empty cell (``pass``) through ``env.execute``, median, for the
  worker process and for the in-process sandbox;
- ``llm_query_batch`` of 1000 prompts from a cell, in-process vs in a worker, against a
  fake OpenAI server in its own process at 0.5 s latency (one shared client,
  max_concurrency=1000), median of 3 rounds each, interleaved;
- start with a 100 MB context: a str (sent as raw bytes) and a list of 1000 strings of
  100 KB (sent as JSON), median of 5.

Targets (issue 5): start < 150 ms, cell overhead < 5 ms, batch within 10% of
in-process, 100 MB context start < 1 s. Results: benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import fmt_s, machine_info, median, raise_fd_limit, write_json

from rlm import AsyncOpenAIClient, REPLEnv
from rlm.loop import run_sync
from rlm.testing import spawn_fake_server

N_BATCH = 1000
LATENCY = 0.5
MB100 = 100 * 1024 * 1024


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def worker_start(repeats: int) -> dict[str, Any]:
    """Cold start (template process included) once, then warm starts."""
    from rlm.sandbox import zygote_client

    zygote_client.shutdown_zygote()
    cold, env = _timed(lambda: REPLEnv("ctx", sandbox="process"))
    env.close()
    warm = []
    for _ in range(repeats):
        seconds, env = _timed(lambda: REPLEnv("ctx", sandbox="process"))
        warm.append(seconds)
        assert env.execute("print(len(context))").stdout == "3\n"
        env.close()
    return {"cold_s": cold, "median_s": median(warm), "min_s": min(warm), "max_s": max(warm)}


def cell_overhead(sandbox: str, repeats: int) -> dict[str, Any]:
    with REPLEnv("ctx", sandbox=sandbox) as env:
        for _ in range(20):
            env.execute("pass")
        times = []
        for _ in range(repeats):
            seconds, result = _timed(lambda: env.execute("pass"))
            assert result.error is None
            times.append(seconds)
    return {"median_s": median(times), "min_s": min(times)}


def batch_round(env: REPLEnv) -> float:
    code = f"out = llm_query_batch([f'ECHO {{i}}' for i in range({N_BATCH})])"
    seconds, result = _timed(lambda: env.execute(code))
    assert result.error is None, result.error
    assert env.get("out") == [str(i) for i in range(N_BATCH)]
    return seconds


def fan_out(rounds: int) -> dict[str, Any]:
    raise_fd_limit()
    with spawn_fake_server(latency=LATENCY) as url:
        client = AsyncOpenAIClient(
            model="fake-model", api_key="sk-bench", base_url=url, max_concurrency=N_BATCH
        )
        try:
            envs = {
                "local": REPLEnv("ctx", client=client, sandbox="local", timeout=120),
                "process": REPLEnv("ctx", client=client, sandbox="process", timeout=120),
            }
            batch_round(envs["local"])  # warm the connection pool once
            times: dict[str, list[float]] = {"local": [], "process": []}
            for _ in range(rounds):
                for kind, env in envs.items():
                    times[kind].append(batch_round(env))
            direct = []
            prompts = [f"ECHO {i}" for i in range(N_BATCH)]
            for _ in range(rounds):
                seconds, _ = _timed(lambda: run_sync(client.completion_batch(prompts)))
                direct.append(seconds)
            for env in envs.values():
                env.close()
        finally:
            client.close_sync()
    local, proc = median(times["local"]), median(times["process"])
    assert local is not None and proc is not None
    return {
        "n": N_BATCH,
        "latency_s": LATENCY,
        "in_process_s": local,
        "worker_s": proc,
        "direct_completion_batch_s": median(direct),
        "worker_vs_in_process": proc / local,
        "rounds": {k: v for k, v in times.items()},
    }


def big_context(repeats: int) -> dict[str, Any]:
    text = "x" * MB100
    chunks = ["y" * (100 * 1024)] * 1000
    out: dict[str, Any] = {}
    for name, context, expected in (
        ("str", text, str(MB100)),
        ("list_json", chunks, str(1000)),
    ):
        times = []
        for _ in range(repeats):
            seconds, env = _timed(lambda c=context: REPLEnv(c, sandbox="process"))
            times.append(seconds)
            assert env.execute("print(len(context))").stdout.strip() == expected
            env.close()
        out[name] = {"median_s": median(times), "max_s": max(times)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    quick = args.quick

    start = worker_start(5 if quick else 20)
    env = REPLEnv(sandbox="process")
    protections = env.protections
    env.close()
    overhead = {k: cell_overhead(k, 100 if quick else 500) for k in ("process", "local")}
    fan = fan_out(1 if quick else 3)
    big = big_context(2 if quick else 5)

    rows = [
        ("worker start, median of 20 (template running)", f"{start['median_s'] * 1e3:.1f} ms", "< 150 ms"),
        ("first start incl. template process", f"{start['cold_s'] * 1e3:.0f} ms", ""),
        ("empty cell, worker process (median)", f"{overhead['process']['median_s'] * 1e3:.2f} ms", "< 5 ms"),
        ("empty cell, in-process (median)", f"{overhead['local']['median_s'] * 1e3:.2f} ms", ""),
        (f"llm_query_batch x{N_BATCH} @ {LATENCY} s, in-process", f"{fmt_s(fan['in_process_s'])} s", ""),
        (f"llm_query_batch x{N_BATCH} @ {LATENCY} s, worker", f"{fmt_s(fan['worker_s'])} s",
         "within 10%"),
        ("  worker / in-process", f"{fan['worker_vs_in_process']:.3f}", "<= 1.10"),
        (f"completion_batch x{N_BATCH} direct (reference)", f"{fmt_s(fan['direct_completion_batch_s'])} s", ""),
        ("start with a 100 MB str context (median)", f"{fmt_s(big['str']['median_s'])} s", "< 1 s"),
        ("start with 1000 x 100 KB list context (JSON)", f"{fmt_s(big['list_json']['median_s'])} s", ""),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>10}  {target}")
    active = [k for k, v in protections.items() if v is True]
    print("protections active:", ", ".join(active))
    if protections.get("notes"):
        print("notes:", protections["notes"])

    path = write_json(
        "sandbox-quick.json" if quick else "sandbox.json",
        {
            "machine": machine_info(),
            "command": "python benchmarks/sandbox.py" + (" --quick" if quick else ""),
            "worker_start": start,
            "cell_overhead": overhead,
            "llm_query_batch": fan,
            "context_100mb": big,
            "protections": protections,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
