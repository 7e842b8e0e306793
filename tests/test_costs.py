"""Costs that match the invoice: prompt-cache reads and writes, reasoning tokens, per-model
Batch API discounts, budgets settled at the real price, and a root history the providers'
prefix caches can serve (its earlier messages never change between turns)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rlm_support import ROOT, SUB, make_rlm, repl

from rlm import RLM, AsyncOpenAIClient
from rlm.batchapi import BatchSettings
from rlm.display.metrics import metrics_from_result
from rlm.errors import ConfigError
from rlm.testing import BatchOptions, FakeLLMServer
from rlm.usage import (
    DEFAULT_PRICES,
    BudgetLedger,
    ModelUsage,
    Price,
    Usage,
    UsageMeter,
    check_prices,
    load_prices_file,
    parse_price,
    resolve_prices,
)

# Long enough that a prompt carrying it reaches OpenAI's 1,024-token caching threshold.
LONG = "Read the whole report before answering. " * 120
CACHED_PRICES = {"m": {"input": 1.0, "output": 2.0, "cached_input": 0.1}}
FAST = BatchSettings(poll_min_s=0.02)


def cost_of(usage: ModelUsage | Usage, price: Price) -> float:
    return price.cost(usage.prompt_tokens, usage.completion_tokens,
                      cached_input_tokens=usage.cached_input_tokens,
                      cache_creation_tokens=usage.cache_creation_tokens)


def root_turns(trajectory: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in trajectory if e["type"] == "root_reply" and not e.get("depth")]


def ten_turns() -> list[str]:
    steps = [repl(f"print(context.splitlines()[{i}])", f"Line {i}.") for i in range(9)]
    return [*steps, repl("FINAL('read')")]


# -- prices ------------------------------------------------------------------------


def test_a_pair_still_prices_input_and_output_and_caches_at_input() -> None:
    price = check_prices({"m": (1.5, 6.0)})["m"]
    assert price == Price(1.5, 6.0, cached_input=1.5, cache_write=1.5, batch_discount=0.5)
    assert parse_price("m=1.5,6")[1] == price


def test_the_built_in_table_has_cached_prices_for_openai_models() -> None:
    table = resolve_prices()
    assert table["gpt-4o-mini"].cached_input == 0.075
    assert table["gpt-5"].cached_input == 0.125
    assert table["o4-mini"].cached_input == 0.275
    # A plain pair in the table still works (snapshots priced on their own, say).
    assert DEFAULT_PRICES["gpt-4o-2024-05-13"] == (5.00, 15.00)
    assert table["gpt-4o-2024-05-13"].cached_input == 5.00


def test_claude_models_read_the_cache_at_a_tenth_and_write_it_at_one_and_a_quarter() -> None:
    price = check_prices({"anthropic/claude-sonnet-4-5": (3.0, 15.0)})["anthropic/claude-sonnet-4-5"]
    assert price.cached_input == pytest.approx(0.3)
    assert price.cache_write == pytest.approx(3.75)
    meter = UsageMeter({"claude-sonnet-4-5": (3.0, 15.0)})
    # 1M prompt tokens: 200k uncached, 500k read from the cache, 300k written to it.
    meter.record("claude-sonnet-4-5", 1_000_000, 0, cached_input_tokens=500_000,
                 cache_creation_tokens=300_000)
    assert meter.snapshot().cost_usd == pytest.approx(0.2 * 3.0 + 0.5 * 0.3 + 0.3 * 3.75)


def test_a_prices_file_takes_dict_entries_beside_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({
        "m": {"input": 1.0, "output": 2.0, "cached_input": 0.1, "batch_discount": 0.25},
        "plain": [0.5, 1.0],
    }))
    assert load_prices_file(path)["m"] == Price(1.0, 2.0, cached_input=0.1, batch_discount=0.25)
    monkeypatch.setenv("RLM_PRICES", str(path))
    client = AsyncOpenAIClient(model="m", api_key="k", base_url="http://127.0.0.1:9/v1")
    assert client.price("m") == Price(1.0, 2.0, cached_input=0.1, batch_discount=0.25)
    assert client.price("plain") == Price(0.5, 1.0)


@pytest.mark.parametrize(("entry", "says"), [
    ({"input": 1.0}, "lacks input or output"),
    ({"input": 1.0, "output": 2.0, "cahced_input": 0.1}, "unknown fields ['cahced_input']"),
    ({"input": -1.0, "output": 2.0}, "input price of 'm'"),
    ({"input": 1.0, "output": 2.0, "cached_input": "cheap"}, "cached_input price of 'm'"),
    ({"input": 1.0, "output": 2.0, "batch_discount": 1.5}, "batch_discount of 'm'"),
    ((1.0, 2.0, 3.0), "must be [usd_per_1M_in, usd_per_1M_out]"),
    ("cheap", "must be [usd_per_1M_in, usd_per_1M_out]"),
])
def test_a_bad_price_entry_is_a_one_line_config_error(entry: Any, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        RLM(model="m", api_key="k", base_url="http://127.0.0.1:9/v1", prices={"m": entry})
    message = str(info.value)
    assert says in message
    assert "\n" not in message


def test_a_price_built_in_code_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="a Price takes numbers >= 0"):
        Price(1.0, 2.0, cached_input=-0.1)
    with pytest.raises(ConfigError, match="batch_discount below 1"):
        Price(1.0, 2.0, batch_discount=1.0)


def test_rlm_run_refuses_a_bad_prices_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input": 1.0, "output": 2.0, "cached": 0.1}}))
    context = tmp_path / "ctx.txt"
    context.write_text("x")
    proc = rlm_cmd("run", "--context", str(context), "--query", "q", "--api-key", "k",
                   "--base-url", "http://127.0.0.1:9/v1", "--prices", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown fields ['cached']" in lines[0]


# -- what a call costs ---------------------------------------------------------------


async def test_cached_and_reasoning_tokens_are_counted_and_priced() -> None:
    async with FakeLLMServer(reasoning={"m": 64}) as srv:
        async with AsyncOpenAIClient(model="m", api_key="k", base_url=srv.url,
                                     prices=CACHED_PRICES) as client:
            await client.completion(LONG + "first")
            first = client.usage
            await client.completion(LONG + "second")
            usage = client.usage
    assert first.cached_input_tokens == 0
    used = usage.by_model["m"]
    # The prompts share LONG, 4,920 characters (1,230 of the fake's tokens): cached, by
    # OpenAI's rule, from 1,024 tokens on in steps of 128, as the server reported.
    assert used.cached_input_tokens == usage.cached_input_tokens == 1152
    assert used.reasoning_tokens == usage.reasoning_tokens == 128
    assert usage.cached_share == pytest.approx(1152 / usage.prompt_tokens)
    assert usage.cost_usd == pytest.approx(cost_of(used, check_prices(CACHED_PRICES)["m"]))
    # Less than list price, by what the cached tokens saved.
    at_list = (usage.prompt_tokens * 1.0 + usage.completion_tokens * 2.0) / 1e6
    assert usage.cost_usd == pytest.approx(at_list - 1152 * 0.9 / 1e6)


async def test_a_reply_from_the_cache_saves_what_its_original_call_cost(tmp_path: Path) -> None:
    async with FakeLLMServer() as srv:
        async with AsyncOpenAIClient(model="m", api_key="k", base_url=srv.url,
                                     prices=CACHED_PRICES, cache=tmp_path) as first:
            await first.completion(LONG + "first")
            before = first.usage
            await first.completion(LONG + "second")  # reads the provider's prompt cache
            original = first.usage - before
        async with AsyncOpenAIClient(model="m", api_key="k", base_url=srv.url,
                                     prices=CACHED_PRICES, cache=tmp_path) as again:
            await again.completion(LONG + "second")
            replayed = again.usage
    assert srv.requests == 2  # the replay sent nothing
    assert original.cached_input_tokens == 1152 and replayed.cached_calls == 1
    # It saved what the original call paid, prompt-cache discount included, not list price.
    assert replayed.saved_usd == pytest.approx(original.cost_usd)
    at_list = (original.prompt_tokens * 1.0 + original.completion_tokens * 2.0) / 1e6
    assert replayed.saved_usd < at_list


def test_an_older_cache_store_gains_the_token_detail_columns(tmp_path: Path) -> None:
    import sqlite3

    from rlm.cache import CachedReply, SQLiteCache

    conn = sqlite3.connect(tmp_path / "cache.sqlite3")
    conn.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT "
                 "NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
                 "size INTEGER NOT NULL, created REAL NOT NULL, accessed REAL NOT NULL, "
                 "hits INTEGER NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO entries VALUES ('old', 'reply', 'm', 10, 2, 200, 0, 0, 0)")
    conn.commit()
    conn.close()
    store = SQLiteCache(tmp_path)
    try:
        store.put_many({"new": CachedReply("r", "m", 2000, 5, 1024, 0, 64)})
        found = store.get_many(["old", "new"])
    finally:
        store.close()
    assert found["old"] == CachedReply("reply", "m", 10, 2)
    assert found["new"] == CachedReply("r", "m", 2000, 5, 1024, 0, 64)


def test_usage_snapshots_add_and_subtract_the_new_counters() -> None:
    a = Usage(by_model={"m": ModelUsage(1, 100, 10, 110, cached_input_tokens=60,
                                        reasoning_tokens=4, batch_calls=1, batch_saved_usd=0.5)},
              calls=1, prompt_tokens=100, completion_tokens=10, total_tokens=110,
              cached_input_tokens=60, reasoning_tokens=4, batch_calls=1, batch_saved_usd=0.5)
    both = a + a
    assert both.cached_input_tokens == both.by_model["m"].cached_input_tokens == 120
    assert both.reasoning_tokens == 8 and both.batch_saved_usd == 1.0
    assert (both - a).by_model["m"] == a.by_model["m"]
    data = both.to_dict()
    assert data["cached_input_tokens"] == 120
    assert data["by_model"]["m"]["reasoning_tokens"] == 8
    assert "cached_input=120 (60%)" in repr(both)


async def test_the_batch_discount_is_the_models_own() -> None:
    async with FakeLLMServer(batches=BatchOptions(delay=0.05)) as srv:
        async with AsyncOpenAIClient(
            model=SUB, api_key="k", base_url=srv.url,
            prices={SUB: {"input": 1.0, "output": 1.0, "batch_discount": 0.25}},
        ) as client:
            await (await client.submit_batch(["ECHO a", "ECHO b"], settings=FAST)).results()
            batch = client.usage
            await client.completion_batch(["ECHO a", "ECHO b"], cache=False)
            live = client.usage - batch
    assert batch.batch_calls == 2 and live.batch_calls == 0
    assert batch.cost_usd == pytest.approx(live.cost_usd * 0.75)
    assert batch.batch_saved_usd == pytest.approx(live.cost_usd * 0.25)


def test_a_batch_mode_jobs_summary_says_what_the_batch_api_saved(
    tmp_path: Path, closing: list[RLM]
) -> None:
    turns = [repl("parts = llm_query_batch(['ECHO ' + w for w in context.split()[:2]])"),
             repl("FINAL('-'.join(parts))")]
    tasks = [{"id": f"t{i}", "query": "Join the first two words.", "context": f"a{i} b{i}"}
             for i in range(4)]
    with FakeLLMServer(scripts={ROOT: turns}, batches=BatchOptions(delay=0.05)) as srv:
        rlm = make_rlm(srv, closing, prices={ROOT: (1.0, 4.0), SUB: (0.5, 2.0)})
        summary = rlm.run_job(tasks, tmp_path / "out.jsonl", progress=False, batch_api=FAST)
    assert summary.done == 4
    # At half price, what was saved equals what was paid.
    assert summary.batch_saved_usd == pytest.approx(summary.cost_usd)
    assert f"saved ${summary.batch_saved_usd:.4f} off list price" in summary.line()


# -- budgets -------------------------------------------------------------------------


async def test_a_ledger_reserves_at_list_price_and_settles_at_the_real_one() -> None:
    ledger = BudgetLedger(max_cost_usd=10.0, prices=CACHED_PRICES)
    hold = await ledger.reserve("m", 4_000_000, 1)
    assert hold is not None and hold.cost == pytest.approx(1.0 + 1 * 2.0 / 1e6)
    ledger.settle(hold, "m", 1_000_000, 0, cached_input_tokens=800_000)
    assert ledger.spent_cost == pytest.approx(0.2 * 1.0 + 0.8 * 0.1)


def budget_run(prices: dict[str, Any], closing: list[RLM]) -> Any:
    with FakeLLMServer(scripts={ROOT: ten_turns()}) as srv:
        rlm = make_rlm(srv, closing, prices=prices, max_cost_usd=0.006, max_iterations=10)
        return rlm.completion(context="\n".join(f"line {i}" for i in range(20)), query=LONG)


def test_a_cost_budget_binds_at_the_cached_price(closing: list[RLM]) -> None:
    cached = {ROOT: {"input": 1.0, "output": 1.0, "cached_input": 0.1}, SUB: (1.0, 1.0)}
    result = budget_run(cached, closing)
    usage = result.usage["root"]
    # The ten turns fit the budget at what they really cost, not at list price.
    assert result.stopped_reason == "final" and result.answer == "read"
    assert usage.cost_usd < 0.006 < usage.prompt_tokens * 1.0 / 1e6
    # The same run priced without a cached price runs out part-way.
    listed = budget_run({ROOT: (1.0, 1.0), SUB: (1.0, 1.0)}, closing)
    assert listed.stopped_reason == "budget" and "max_cost_usd=0.006" in (listed.error or "")


# -- the root's history and the prompt cache ---------------------------------------------


def test_root_history_is_append_only_so_every_later_turn_reads_the_cache(
    closing: list[RLM],
) -> None:
    with FakeLLMServer(scripts={ROOT: ten_turns()}) as srv:
        rlm = make_rlm(srv, closing, max_iterations=10)
        result = rlm.completion(context="\n".join(f"line {i}" for i in range(20)), query=LONG)
        sent = [r["messages"] for r in srv.requests_log if r["model"] == ROOT]
    assert result.answer == "read" and len(sent) == 10
    for before, after in zip(sent, sent[1:], strict=False):
        # Every message sent before is sent again, byte for byte, ahead of the new ones.
        assert json.dumps(after[:len(before)]) == json.dumps(before)
        assert len(after) > len(before)
    turns = root_turns(result.trajectory)
    assert [t["iteration"] for t in turns] == list(range(1, 11))
    assert all(t["usage"]["cached_input_tokens"] > 0 for t in turns[1:])
    assert result.usage["root"].cached_input_tokens == sum(
        t["usage"]["cached_input_tokens"] for t in turns)


# -- showing it --------------------------------------------------------------------------


def test_the_summary_shows_cached_share_reasoning_and_batch_savings() -> None:
    usage = Usage(calls=2, prompt_tokens=1000, completion_tokens=100, total_tokens=1100,
                  cached_input_tokens=620, reasoning_tokens=64, batch_calls=2,
                  batch_saved_usd=0.0125)
    m = metrics_from_result({"answer": "x", "usage": {"root": usage, "sub": Usage()}})
    rows = dict(m.rows())
    assert rows["Prompt cache"].startswith("62% of prompt tokens")
    assert rows["Reasoning"] == "64 completion tokens"
    assert rows["Batch API"] == "2 calls, saved $0.0125 off list price"
    assert "62% input cached · 64 reasoning · batch saved $0.0125" in m.summary()
    plain = metrics_from_result({"answer": "x", "usage": {"root": Usage(calls=1), "sub": Usage()}})
    assert not {"Prompt cache", "Reasoning", "Batch API"} & dict(plain.rows()).keys()


def rlm_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    return subprocess.run([sys.executable, "-m", "rlm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_rlm_run_summary_and_rlm_view_show_the_cached_share(tmp_path: Path) -> None:
    context = tmp_path / "ctx.txt"
    context.write_text("\n".join(f"line {i}" for i in range(20)))
    with FakeLLMServer(scripts={ROOT: ten_turns()[-3:]}) as srv:
        proc = rlm_cmd("run", "--context", str(context), "--query", LONG, "--model", ROOT,
                       "--base-url", srv.url, "--api-key", "k", "--sandbox", "local", "-v",
                       "--price", f"{ROOT}=1,1", "--log-dir", str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr
    assert "input cached" in proc.stderr
    log = next((tmp_path / "logs").glob("*.jsonl"))
    view = rlm_cmd("view", str(log))
    assert view.returncode == 0, view.stderr
    assert "of prompt tokens read from the provider's cache" in view.stdout
    page = tmp_path / "run.html"
    assert rlm_cmd("view", str(log), "--html", str(page)).returncode == 0
    assert "of prompt tokens read from the provider&#x27;s cache" in page.read_text()


def test_a_cost_budget_binds_a_run_against_a_server_that_sends_no_usage(closing: list[RLM]) -> None:
    # Every reply lacks `usage`: the calls settle at their reservation estimates, so the
    # cap still stops the run, and the run's record says its usage is estimated.
    turn = repl("r = llm_query_batch(['ECHO ' + str(i) for i in range(4)])\nprint(len(r))")
    with FakeLLMServer(scripts={ROOT: [turn] * 30}) as srv:
        srv.inject("no_usage", count=10_000)
        rlm = make_rlm(srv, closing, prices={ROOT: (1000.0, 1000.0), SUB: (1000.0, 1000.0)},
                       max_cost_usd=0.5, max_iterations=30)
        result = rlm.completion(context="x" * 2_000, query="q")
        requests = srv.stats()["requests"]
    assert result.stopped_reason == "budget"
    assert requests < 30 * 5  # stopped long before the 30 turns ran
    total = result.usage["root"] + result.usage["sub"]
    assert total.estimated_calls == total.calls > 0
    assert total.cost_usd > 0 and total.prompt_tokens > 0
    end = next(e for e in result.trajectory if e["type"] == "run_end")
    root = end["usage"]["root"]
    assert root["estimated_calls"] == root["calls"] > 0
