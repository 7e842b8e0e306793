"""AsyncOpenAIClient against FakeLLMServer over real loopback sockets."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from pydantic import BaseModel

from rlm import AsyncOpenAIClient
from rlm.errors import (
    BatchError,
    ClientClosedError,
    ConfigError,
    LLMError,
    LLMTimeoutError,
    RateLimitError,
    ResponseError,
)
from rlm.loop import run_sync
from rlm.testing import FakeLLMServer, Fault, echo_responder


def make_client(srv: FakeLLMServer, **kw: object) -> AsyncOpenAIClient:
    kw.setdefault("max_concurrency", 64)
    return AsyncOpenAIClient(model="fake-model", api_key="test-key", base_url=srv.url, **kw)  # type: ignore[arg-type]


async def test_completion_returns_the_reply_text(server: FakeLLMServer) -> None:
    async with make_client(server) as client:
        assert await client.completion("ECHO hello") == "hello"


async def test_completion_accepts_a_list_of_messages(server: FakeLLMServer) -> None:
    async with make_client(server) as client:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ECHO ok"}]
        assert await client.completion(messages, temperature=0) == "ok"
    logged = server.requests_log[-1]
    assert logged["messages"][0]["role"] == "system"
    assert logged["params"]["temperature"] == 0
    assert logged["has_authorization"]


async def test_batch_keeps_order() -> None:
    with FakeLLMServer(latency=(0.0, 0.05)) as srv:
        async with make_client(srv) as client:
            out = await client.completion_batch([f"ECHO {i}" for i in range(200)])
    assert out == [str(i) for i in range(200)]


async def test_limiter_never_exceeds_max_concurrency() -> None:
    with FakeLLMServer(latency=0.05) as srv:
        async with make_client(srv, max_concurrency=7) as client:
            await client.completion_batch([f"ECHO {i}" for i in range(100)])
        assert srv.requests == 100
        assert srv.peak_in_flight == 7


async def test_batch_really_fans_out_up_to_the_limit() -> None:
    with FakeLLMServer(latency=0.2) as srv:
        async with make_client(srv, max_concurrency=500) as client:
            await client.completion_batch([f"ECHO {i}" for i in range(300)])
        assert srv.peak_in_flight == 300


async def test_429_with_retry_after_is_retried_and_succeeds(server: FakeLLMServer) -> None:
    server.inject("429", count=2, retry_after=0.1)
    async with make_client(server, max_retries=3) as client:
        assert await client.completion("ECHO after429") == "after429"
        assert client.usage.retries == 2
    assert server.requests == 3


async def test_retry_after_ms_is_honoured(server: FakeLLMServer) -> None:
    server.inject("429", count=1, retry_after_ms=300)
    async with make_client(server) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await client.completion("ECHO x") == "x"
        waited = loop.time() - start
    # The retry happened no earlier than the server asked (a lower bound, not a timing claim).
    assert waited >= 0.3


async def test_a_server_that_refuses_load_gets_paced_to_what_it_accepts() -> None:
    # The server accepts 8 requests at a time and answers 429 (no Retry-After) to the rest.
    def capped(messages: list[dict[str, Any]]) -> str | Fault:
        return Fault("429") if srv.in_flight > 8 else echo_responder(messages)

    with FakeLLMServer(capped, latency=0.02) as srv:
        async with make_client(srv, max_concurrency=64) as client:
            out = await client.completion_batch([f"ECHO {i}" for i in range(600)])
            learned = client.rate_limits()["fake-model"].rate_per_s
            hits = client.usage.rate_limit_hits
        assert out == [str(i) for i in range(600)]
        # 64 in flight at 0.02 s would be 3,200/s; 8 at a time is at most 400/s.
        assert learned is not None and learned < 800
        # Unpaced, 56 of each wave of 64 would be refused, and again on every retry:
        # thousands of 429s. Paced, fewer than half the items meet one (the server's
        # capacity is counted in flight, so a loaded machine shifts it: 259 was seen).
        assert hits == srv.faults_served < 600 // 2


async def test_random_faults_keep_the_in_flight_limit_up() -> None:
    rng = random.Random(3)

    def flaky(messages: list[dict[str, Any]]) -> str | Fault:
        return Fault("503") if rng.random() < 0.2 else echo_responder(messages)

    with FakeLLMServer(flaky, latency=0.01) as srv:
        async with make_client(srv, max_concurrency=32) as client:
            out = await client.completion_batch([f"ECHO {i}" for i in range(600)])
            limiter = client.limiter
        assert out == [str(i) for i in range(600)]
        # Cutting per fault epoch would have paced it down to a trickle; the faults are
        # learned as load-independent, and the pace from before the cuts comes back.
        assert 0.1 < limiter.base_rejection < 0.3
        assert limiter.pacer.rate is None or limiter.pacer.rate > 32 / 0.01 / 4


async def test_refusals_are_retried_until_the_retry_timeout_then_a_typed_error(
    server: FakeLLMServer,
) -> None:
    server.inject("429", count=10_000, retry_after=0.05)
    async with make_client(server, max_retries=0, retry_timeout_s=0.5) as client:
        with pytest.raises(RateLimitError, match="rate limited after [0-9]+ retries") as info:
            await client.completion("ECHO x")
        usage = client.usage
    # max_retries bounds faults, not refusals: those go on until the deadline.
    assert info.value.attempts > 3
    assert "retry_timeout_s=0.5" in str(info.value)
    assert "Rate limit reached" in str(info.value)  # the server's own words
    assert usage.failed_calls == 1
    assert usage.rate_limit_hits == info.value.attempts


async def test_500_then_success(server: FakeLLMServer) -> None:
    server.inject("500", count=1)
    async with make_client(server) as client:
        assert await client.completion("ECHO fine") == "fine"
    assert server.faults_served == 1
    assert server.requests == 2


async def test_503_and_dropped_connection_are_retried(server: FakeLLMServer) -> None:
    server.inject("503", count=1)
    server.inject("drop", count=1)
    async with make_client(server, max_retries=3) as client:
        assert await client.completion("ECHO ok") == "ok"
        assert client.usage.retries == 2


async def test_a_4xx_answer_is_not_retried(server: FakeLLMServer) -> None:
    # A wrong base path gets the server's 404: a client error that no retry can fix.
    async with AsyncOpenAIClient(model="m", api_key="k", base_url=server.url + "/nowhere") as client:
        with pytest.raises(LLMError, match=r"request rejected \(404\)"):
            await client.completion("ECHO x")
        assert client.usage.retries == 0
        assert client.usage.failed_calls == 1


async def test_hung_server_ends_in_a_clear_timeout_error(server: FakeLLMServer) -> None:
    server.inject("hang", count=5)
    async with make_client(server, timeout=0.3, max_retries=1) as client:
        with pytest.raises(LLMTimeoutError, match=r"no answer within 0.3 s after 1 retry"):
            await client.completion("ECHO x")


async def test_malformed_json_gives_a_clear_error(server: FakeLLMServer) -> None:
    server.inject("malformed", count=1)
    async with make_client(server) as client:
        with pytest.raises(ResponseError, match="not valid JSON"):
            await client.completion("ECHO x")


async def test_streaming_assembles_text_and_records_usage(server: FakeLLMServer) -> None:
    async with make_client(server) as client:
        pieces = [p async for p in client.completion_stream("ECHO a streamed reply")]
        assert len(pieces) > 1
        assert "".join(pieces) == "a streamed reply"
        usage = client.usage
        assert usage.calls == 1
        assert usage.completion_tokens == len("a streamed reply") // 4
        assert usage.prompt_tokens > 0


async def test_usage_totals_exact_after_2000_concurrent_calls() -> None:
    with FakeLLMServer(latency=(0.0, 0.02)) as srv:
        async with make_client(srv, max_concurrency=500, prices={"fake-model": (1.0, 2.0)}) as c:
            prompts = [f"ECHO {i:04d}" for i in range(2000)]  # each reply is 4 chars -> 1 token
            await c.completion_batch(prompts)
            usage = c.usage
    prompt_tokens = sum(max(1, len(p) // 4) for p in prompts)
    assert usage.calls == 2000
    assert usage.completion_tokens == 2000
    assert usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == prompt_tokens + 2000
    assert usage.by_model["fake-model"].calls == 2000
    assert usage.cost_usd == pytest.approx((prompt_tokens * 1.0 + 2000 * 2.0) / 1e6)


def test_a_dated_snapshot_costs_what_its_model_costs() -> None:
    client = AsyncOpenAIClient(model="gpt-4o-mini-2024-07-18", api_key="k")
    client._meter.record("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000)  # noqa: SLF001
    assert client.usage.cost_usd == pytest.approx(0.15 + 0.60)


async def test_batch_with_failures_keeps_partial_results() -> None:
    def responder(messages: list[dict]) -> str | Fault:
        text = messages[-1]["content"]
        return Fault("500") if text.endswith("3") else text

    with FakeLLMServer(responder) as srv:
        async with make_client(srv, max_retries=1) as client:
            prompts = [f"item {i}" for i in range(10)]
            with pytest.raises(BatchError) as info:
                await client.completion_batch(prompts)
            err = info.value
            assert list(err.errors) == [3]
            assert err.results[:3] == ["item 0", "item 1", "item 2"]
            assert err.results[3] is None
            assert err.results[4:] == [f"item {i}" for i in range(4, 10)]

            inline = await client.completion_batch(prompts, return_exceptions=True)
            assert isinstance(inline[3], LLMError)
            assert "server error 500 after 1 retry" in str(inline[3])
            assert inline[9] == "item 9"


async def test_batch_reports_progress(server: FakeLLMServer) -> None:
    seen: list[tuple[int, int]] = []
    async with make_client(server) as client:
        await client.completion_batch(["ECHO a", "ECHO b", "ECHO c"], on_item_done=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


class City(BaseModel):
    name: str
    population: int


async def test_structured_returns_a_validated_model() -> None:
    with FakeLLMServer(lambda m: '{"name": "Oslo", "population": 709000}') as srv:
        async with make_client(srv) as client:
            city = await client.structured("biggest city in Norway?", City)
        params = srv.requests_log[-1]["params"]
    assert city == City(name="Oslo", population=709000)
    assert params["response_format"]["type"] == "json_schema"
    assert params["response_format"]["json_schema"]["schema"]["required"] == ["name", "population"]


async def test_structured_rejects_an_invalid_reply() -> None:
    with FakeLLMServer(lambda m: '{"name": "Oslo"}') as srv:
        async with make_client(srv) as client:
            with pytest.raises(ResponseError, match="does not match City"):
                await client.structured("?", City)


async def test_missing_key_names_the_variable_and_the_argument(server: FakeLLMServer) -> None:
    client = AsyncOpenAIClient(model="m", base_url=server.url)  # constructor does no I/O
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as info:
        await client.completion("hi")
    assert "api_key=" in str(info.value)
    with pytest.raises(ConfigError):
        await client.completion_batch(["a", "b"])
    assert server.requests == 0


def test_configuration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, server: FakeLLMServer) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("RLM_MODEL", "env-model")
    client = AsyncOpenAIClient()
    assert run_sync(client.completion("ECHO from env")) == "from env"
    assert server.requests_log[-1]["model"] == "env-model"
    client.close_sync()


def test_bad_options_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_concurrency"):
        AsyncOpenAIClient(api_key="k", max_concurrency=0)
    with pytest.raises(ConfigError, match="max_retries"):
        AsyncOpenAIClient(api_key="k", max_retries=-1)


async def test_close_twice_is_harmless_and_use_after_close_is_clear(server: FakeLLMServer) -> None:
    client = make_client(server)
    assert await client.completion("ECHO x") == "x"
    await client.close()
    await client.close()
    with pytest.raises(ClientClosedError, match="closed"):
        await client.completion("ECHO y")


def test_many_sync_batches_in_a_row_reuse_the_pool() -> None:
    with FakeLLMServer(latency=0.02) as srv:
        client = make_client(srv, max_concurrency=10)
        for round_ in range(5):
            out = run_sync(client.completion_batch([f"ECHO {round_}-{i}" for i in range(10)]))
            assert out == [f"{round_}-{i}" for i in range(10)]
        # 50 requests over at most 10 connections: the pool survived every batch
        assert srv.requests == 50
        assert srv.connections <= 10
        client.close_sync()


def test_a_large_batch_raises_gc_thresholds_only_while_it_runs() -> None:
    import gc

    seen: set[int] = set()

    def responder(messages: list[dict]) -> str:
        seen.add(gc.get_threshold()[0])  # the server thread shares this process's collector
        return "ok"

    before = gc.get_threshold()
    with FakeLLMServer(responder) as srv:
        client = make_client(srv, max_concurrency=200)
        # Distinct prompts: identical ones would be sent once (single-flight).
        run_sync(client.completion_batch([f"x{i}" for i in range(1000)]))
        assert gc.get_threshold() == before
        assert seen == {max(before[0], 50_000)}
        seen.clear()
        run_sync(client.completion_batch(["x"] * 10))  # small batches leave the collector alone
        assert seen == {before[0]}
        client.close_sync()
