"""Prompt caching of the root's history: the cached share of root input on a 10-turn run.

    python benchmarks/prompt_cache.py              # 10 root turns
    python benchmarks/prompt_cache.py --turns 20   # longer

An RLM root re-sends its whole conversation every turn. Providers cache repeated
prompt prefixes (OpenAI: prompts of at least 1,024 tokens, in 128-token steps), so when
the conversation only grows at its end most of each turn's input is a cache read, at a
tenth of the input price on gpt-5-mini. This measures it against FakeLLMServer, which
reports ``prompt_tokens_details.cached_tokens`` by OpenAI's prefix rule:

- append-only: a real run (``RLM.completion``) of a scripted root that looks at a log in
  ``--turns`` turns, each printing a slice of it, then answers;
- rewritten: the same conversation sent again, turn by turn, to a fresh server, but with
  the first user message (or the system prompt) changed every turn (an "iterations
  left" note, the mistake this guards against): everything after the change is read at
  full price.

Both use gpt-5-mini's built-in prices (input $0.25, cached input $0.025, output $2.00
per 1M tokens). Each row: prompt tokens, cached tokens, cached share, the turns after
the first that read the cache, and what the input cost against what it would cost at
list price. Results: benchmarks/results/prompt_cache.json.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
from typing import Any

from _common import machine_info, write_json

from rlm import RLM, AsyncOpenAIClient
from rlm.testing import FakeLLMServer
from rlm.usage import DEFAULT_PRICES, to_price

MODEL = "gpt-5-mini"
SUB = "gpt-5-nano"
QUERY = ("Which user ids appear in more than one ERROR line, and what were the first and last "
         "timestamps of each? Count the ERROR lines per hour too.")


def _log(lines: int) -> str:
    levels = ("INFO", "INFO", "WARN", "ERROR")
    return "\n".join(
        f"2026-03-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d} {levels[i % 4]} "
        f"user=u{i * 7 % 97} request={i} took={i * 13 % 900}ms"
        for i in range(lines)
    )


def _script(turns: int) -> list[str]:
    steps = [
        f"Reading part {i} of the log.\n```repl\nlines = context.splitlines()\n"
        f"part = [l for l in lines[{(i - 1) * 400}:{i * 400}] if ' ERROR ' in l]\n"
        f"print(len(part), 'errors in part {i}')\nprint('\\n'.join(part[:8]))\n```"
        for i in range(1, turns)
    ]
    return [*steps, "```repl\nFINAL('u7, u14 and u21 repeat')\n```"]


def _row(name: str, turns: list[dict[str, int]]) -> dict[str, Any]:
    price = to_price(MODEL, DEFAULT_PRICES[MODEL])
    prompt = sum(t["prompt_tokens"] for t in turns)
    cached = sum(t["cached_input_tokens"] for t in turns)
    completion = sum(t["completion_tokens"] for t in turns)
    # Input only: the rewritten rows' replies are stand-ins, so their output differs.
    cost = price.cost(prompt, 0, cached_input_tokens=cached)
    listed = price.list_cost(prompt, 0)
    later = turns[1:]
    return {
        "kind": name,
        "turns": len(turns),
        "prompt_tokens": prompt,
        "cached_input_tokens": cached,
        "cached_share": round(cached / prompt, 4) if prompt else 0.0,
        "turns_reading_cache_after_first": sum(1 for t in later if t["cached_input_tokens"] > 0),
        "completion_tokens": completion,
        "input_cost_usd": round(cost, 6),
        "input_list_cost_usd": round(listed, 6),
        "per_turn": turns,
    }


def append_only(turns: int) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """A real run; its root turns' usage, and the messages each root request sent."""
    with FakeLLMServer(scripts={MODEL: _script(turns)}) as srv:
        root = AsyncOpenAIClient(model=MODEL, api_key="k", base_url=srv.url)
        sub = AsyncOpenAIClient(model=SUB, api_key="k", base_url=srv.url)
        try:
            rlm = RLM(model=MODEL, recursive_model=SUB, client=root, sub_client=sub,
                      sandbox="local", max_iterations=turns)
            result = rlm.completion(context=_log(turns * 400), query=QUERY)
        finally:
            root.close_sync()
            sub.close_sync()
        sent = [r["messages"] for r in srv.requests_log if r["model"] == MODEL]
    if result.answer is None:
        raise SystemExit(f"the run failed: {result.error}")
    usage = [_turn_usage(e["usage"]) for e in result.trajectory if e["type"] == "root_reply"]
    return _row("append-only (rlm)", usage), sent


def rewritten(sent: list[list[dict[str, Any]]], index: int, name: str) -> dict[str, Any]:
    """The same requests, with message ``index`` changed at every turn."""
    with FakeLLMServer(scripts={MODEL: ["ok"]}) as srv:
        return asyncio.run(_resend(srv.url, sent, index, name))


async def _resend(url: str, sent: list[list[dict[str, Any]]], index: int,
                  name: str) -> dict[str, Any]:
    usage = []
    async with AsyncOpenAIClient(model=MODEL, api_key="k", base_url=url) as client:
        for turn, messages in enumerate(sent, 1):
            changed = copy.deepcopy(messages)
            changed[index]["content"] += f"\n\n(You have {len(sent) - turn + 1} iterations left.)"
            meter = client.new_meter()
            await client.send(client.request(changed), meter=meter)
            snap = meter.snapshot()
            usage.append({"prompt_tokens": snap.prompt_tokens,
                          "completion_tokens": snap.completion_tokens,
                          "cached_input_tokens": snap.cached_input_tokens})
    return _row(name, usage)


def _turn_usage(usage: dict[str, Any]) -> dict[str, int]:
    return {name: int(usage[name])
            for name in ("prompt_tokens", "completion_tokens", "cached_input_tokens")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--turns", type=int, default=10, help="root turns (default 10)")
    args = parser.parse_args(argv)
    base, sent = append_only(args.turns)
    rows = [base, rewritten(sent, 1, "first user msg rewritten"),
            rewritten(sent, 0, "system prompt rewritten")]
    print(f"root prompt caching over {args.turns} turns ({MODEL} prices; fake server, "
          "OpenAI's prefix rule)")
    print(f"{'kind':<26}{'prompt tok':>11}{'cached':>9}{'share':>7}{'turns hit':>10}"
          f"{'input $':>10}{'at list':>10}")
    for row in rows:
        print(f"{row['kind']:<26}{row['prompt_tokens']:>11,}{row['cached_input_tokens']:>9,}"
              f"{row['cached_share']:>7.0%}"
              f"{row['turns_reading_cache_after_first']:>6}/{row['turns'] - 1:<3}"
              f"{row['input_cost_usd']:>10.5f}{row['input_list_cost_usd']:>10.5f}")
    print("per turn (append-only): prompt/cached tokens "
          + ", ".join(f"{t['prompt_tokens']}/{t['cached_input_tokens']}" for t in base["per_turn"]))
    path = write_json("prompt_cache.json", {"machine": machine_info(), "model": MODEL,
                                            "query": QUERY, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
