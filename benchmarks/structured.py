"""Structured sub-queries: what schema= costs over a plain llm_query_batch.

    python benchmarks/structured.py            # N=1000 at 0.2 s, 5 rounds
    python benchmarks/structured.py --quick    # N=200, 3 rounds

Measured through the public API:

- a batch of N prompts from a REPL cell (sandbox="local"), plain vs with a JSON Schema
  (``response_format`` sent, each reply parsed and validated in the host), against one
  FakeLLMServer on a background thread of this process at a fixed latency; rounds
  interleaved, median wall time, ratio;
- the host's CPU per structured reply: parsing and validating one typical reply
  (``rlm.schema``), median of many, in microseconds.

The server shares this interpreter, so wall times include its CPU for both kinds
alike; the ratio is the number to read. Results: benchmarks/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from _common import fmt_s, machine_info, median, raise_fd_limit, write_json

from rlm import AsyncOpenAIClient, REPLEnv
from rlm.schema import Schema, parse_json_text
from rlm.testing import FakeLLMServer

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "ids": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["count", "ids"],
}
REPLY = {"count": 3, "ids": ["a-1", "b-22", "c-333"]}


def answer(messages: list[dict[str, Any]], response_format: dict[str, Any]) -> dict[str, Any]:
    return REPLY


def batch_rounds(n: int, latency: float, rounds: int) -> dict[str, Any]:
    """Wall time of one llm_query_batch of n prompts, plain and structured, interleaved."""
    plain_code = f"r = llm_query_batch(['ECHO ' + str(i) for i in range({n})])\nprint(len(r))"
    typed_code = (
        f"r = llm_query_batch(['item ' + str(i) for i in range({n})], schema={SCHEMA!r})\n"
        "print(sum(x['count'] for x in r))"
    )
    times: dict[str, list[float]] = {"plain": [], "schema": []}
    with FakeLLMServer(json_responder=answer, latency=latency) as server:
        client = AsyncOpenAIClient(model="m", base_url=server.url, api_key="k",
                                   max_concurrency=n)
        with REPLEnv(client=client, timeout=120) as env:
            env.execute(typed_code.replace(str(n), "2"))  # warm: pool, support probe
            for _ in range(rounds):
                for kind, code in (("plain", plain_code), ("schema", typed_code)):
                    started = time.perf_counter()
                    result = env.execute(code)
                    times[kind].append(time.perf_counter() - started)
                    assert result.error is None, result.error
                    expected = str(n) if kind == "plain" else str(3 * n)
                    assert result.stdout.strip() == expected, result.stdout
        client.close_sync()
    plain, typed = median(times["plain"]), median(times["schema"])
    assert plain is not None and typed is not None
    return {
        "n": n,
        "latency_s": latency,
        "rounds": rounds,
        "plain_s": round(plain, 4),
        "schema_s": round(typed, 4),
        "ratio": round(typed / plain, 3),
        "all_plain_s": [round(t, 4) for t in times["plain"]],
        "all_schema_s": [round(t, 4) for t in times["schema"]],
    }


def validation_cpu(repeats: int) -> dict[str, Any]:
    """Host CPU to parse and validate one structured reply, median per reply."""
    schema = Schema.of(SCHEMA)
    text = json.dumps(REPLY)
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(100):
            assert schema.validate(parse_json_text(text)).ok
        samples.append((time.process_time() - started) / 100)
    per = median(samples)
    assert per is not None
    return {"per_reply_us": round(per * 1e6, 1), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    raise_fd_limit()
    n, rounds = (200, 3) if args.quick else (1000, 5)
    batch = batch_rounds(n, 0.2, rounds)
    cpu = validation_cpu(50)
    print(f"llm_query_batch of {n} at 0.2 s: plain {fmt_s(batch['plain_s'])}, "
          f"schema= {fmt_s(batch['schema_s'])}, ratio {batch['ratio']:.2f} "
          f"(median of {rounds}, machine shared)")
    print(f"host CPU to parse and validate one reply: {cpu['per_reply_us']:.1f} us")
    name = "structured-quick.json" if args.quick else "structured.json"
    write_json(name, {"machine": machine_info(), "batch": batch, "validation": cpu})


if __name__ == "__main__":
    main()
