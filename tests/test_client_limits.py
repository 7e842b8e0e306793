"""The client against rate limits, refusals and imperfect servers, over real sockets.

FakeLLMServer's token bucket and random faults cover the plain cases; the rest (token
buckets with OpenAI-style rate-limit headers, per-model buckets, odd Retry-After
headers, errors inside a stream, cut streams, replies without usage, FastAPI error
bodies) are small scripted aiohttp.web servers defined here, each on loopback.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from rlm_support import wait_until

from rlm import AsyncOpenAIClient
from rlm.errors import (
    BudgetExhaustedError,
    LLMConnectionError,
    LLMError,
    RateLimitError,
    RequestTooLargeError,
)
from rlm.llm import RetryNotice
from rlm.testing import FakeLLMServer, random_faults, token_bucket
from rlm.usage import BudgetLedger

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[str]:
    """Serve ``handler(request, body)`` at /v1/chat/completions on a free loopback port;
    yields the base URL."""

    async def chat(request: web.Request) -> web.StreamResponse:
        return await handler(request, await request.json())

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        await runner.cleanup()


def reply_json(text: str, model: str, *, usage: bool = True, headers: Any = None) -> web.Response:
    body: dict[str, Any] = {
        "id": "x", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    return web.json_response(body, headers=headers)


def last_text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def echo(body: dict[str, Any]) -> str:
    return last_text(body).removeprefix("ECHO ")


async def sse(request: web.Request, events: list[Any], *, done: bool = True) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in events:
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())
    if done:
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def client_for(url: str, **kw: Any) -> AsyncOpenAIClient:
    kw.setdefault("model", "m")
    return AsyncOpenAIClient(api_key="k", base_url=url, **kw)


# -- buckets and faults --------------------------------------------------------------


@pytest.mark.parametrize("width", [64, 512, 4096])
async def test_every_item_comes_back_against_a_request_bucket_at_any_width(width: int) -> None:
    with FakeLLMServer(token_bucket(400, burst=100), latency=0.01) as srv:
        async with client_for(srv.url, max_concurrency=width) as client:
            out = await client.completion_batch([f"ECHO {i}" for i in range(1200)])
            usage = client.usage
    assert out == [str(i) for i in range(1200)]
    assert usage.failed_calls == 0
    assert usage.rate_limit_hits == srv.faults_served


async def test_a_bucket_behind_random_503s_still_answers_every_item() -> None:
    responder = random_faults(0.1, kinds=("503",), seed=5, inner=token_bucket(400, burst=100))
    with FakeLLMServer(responder, latency=0.01) as srv:
        async with client_for(srv.url, max_concurrency=512) as client:
            out = await client.completion_batch([f"ECHO {i}" for i in range(1200)])
            usage = client.usage
    assert out == [str(i) for i in range(1200)]
    assert usage.failed_calls == 0


async def test_a_tokens_per_minute_bucket_paces_3000_token_prompts_without_failures() -> None:
    prompts = [f"ECHO {i} " + "x" * 12_000 for i in range(21)]  # ~3,000 tokens each
    with FakeLLMServer(limits={"m": {"tpm": 60_000}}) as srv:
        async with client_for(srv.url, max_concurrency=64) as client:
            out = await client.completion_batch(prompts, max_tokens=5)
            usage = client.usage
            state = client.rate_limits()["m"]
        refused = srv.stats()["rate_limited"]
    assert [o.split()[0] for o in out] == [str(i) for i in range(21)]
    assert usage.failed_calls == 0
    # 60,000 tokens hold 19 such requests: the first wave may overshoot (nothing was
    # known yet); after it the x-ratelimit headers pace the rest.
    assert refused <= 3
    assert state.tpm == 60_000 and state.tpm_from == "headers"


async def test_a_request_larger_than_the_given_tpm_fails_at_once_naming_the_numbers() -> None:
    with FakeLLMServer() as srv:
        async with client_for(srv.url, tpm=10_000) as client:
            with pytest.raises(RequestTooLargeError) as info:
                await client.completion("x" * 60_000, max_tokens=100)
    message = str(info.value)
    assert "m is estimated at 15,101 tokens" in message
    assert "limit of 10,000 tokens per minute" in message
    assert srv.requests == 0


async def test_a_tpm_learned_from_headers_refuses_an_oversized_request_before_sending() -> None:
    with FakeLLMServer(limits={"m": {"tpm": 10_000}}) as srv:
        async with client_for(srv.url) as client:
            assert await client.completion("ECHO small") == "small"
            with pytest.raises(RequestTooLargeError, match="limit of 10,000 tokens per minute"):
                await client.completion("x" * 80_000)
        assert srv.requests == 1


async def test_a_flood_on_the_sub_model_does_not_delay_the_root_model() -> None:
    # One client, two models: the sub model's bucket (60 a minute, a minute deep) holds
    # a flood back for minutes; the root model's has room.
    with FakeLLMServer(limits={"sub": {"rpm": 60, "burst": 60}, "root": {"rpm": 10_000}}) as srv:
        async with client_for(srv.url, max_concurrency=256) as client:
            flood = asyncio.create_task(
                client.completion_batch([f"ECHO {i}" for i in range(200)], model="sub"))
            assert await asyncio.to_thread(wait_until, lambda: srv.requests >= 60)
            assert await client.completion("ECHO turn", model="root") == "turn"
            flood_pending = not flood.done()
            flood.cancel()
            await asyncio.gather(flood, return_exceptions=True)
            sub_pacing = client.rate_limits()["sub"]
        roots = [e for e in srv.requests_log if e["model"] == "root"]
    # The root's turn came back while the sub model's queue was still being paced.
    assert flood_pending
    assert sub_pacing.rpm == 60
    assert len(roots) == 1


# -- waits the server asks for ----------------------------------------------------------


async def refuse_with(headers: dict[str, str], count: int, seen: list[float]) -> Handler:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.Response:
        seen.append(time.monotonic())
        if len(seen) <= count:
            return web.json_response({"error": {"message": "slow down", "type": "requests"}},
                                     status=429, headers=headers)
        return reply_json(echo(body), body["model"])
    return handler


async def test_a_retry_after_past_the_cap_fails_at_once_with_the_delay() -> None:
    seen: list[float] = []
    handler = await refuse_with({"retry-after": "90"}, 10, seen)
    async with scripted(handler) as url, client_for(url, max_retry_wait_s=30) as client:
        with pytest.raises(RateLimitError) as info:
            await client.completion("ECHO x")
    assert info.value.retry_after == 90
    assert "asked to wait 90 s, more than max_retry_wait_s=30" in str(info.value)
    assert len(seen) == 1


async def test_a_retry_after_within_the_cap_is_waited_for_and_shown() -> None:
    seen: list[float] = []
    notices: list[RetryNotice] = []
    noticed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_retry(notice: RetryNotice) -> None:  # on the engine loop
        notices.append(notice)
        loop.call_soon_threadsafe(noticed.set)

    handler = await refuse_with({"retry-after": "90"}, 10, seen)
    async with scripted(handler) as url, client_for(
        url, max_retry_wait_s=120, on_retry=on_retry
    ) as client:
        call = asyncio.create_task(client.completion("ECHO x"))
        await noticed.wait()
        waiting = not call.done()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
    assert waiting and len(seen) == 1
    notice = notices[0]
    assert notice.wait_s >= 90 and notice.refusal and notice.attempt == 1
    assert "429" in notice.failure and "next try in" in str(notice)


async def test_a_litellm_proxys_llm_provider_retry_after_is_honoured() -> None:
    seen: list[float] = []
    handler = await refuse_with({"llm_provider-retry-after-ms": "400"}, 1, seen)
    async with scripted(handler) as url, client_for(url) as client:
        assert await client.completion("ECHO ok") == "ok"
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 0.4  # never sooner than asked


# -- streams -------------------------------------------------------------------------------


def first_then(first: list[Any], then: list[Any]) -> Handler:
    """A streaming handler: the first request gets the events ``first`` and no [DONE],
    every later one the events ``then`` and [DONE]."""
    calls = 0

    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return await (sse(request, first, done=False) if calls == 1 else sse(request, then))

    return handler


async def test_a_rate_limit_inside_a_200_stream_is_retried_like_a_429() -> None:
    error = {"error": {"message": "Rate limit reached for m", "type": "requests",
                       "code": "rate_limit_exceeded"}}
    handler = first_then([error], [chunk("hello "), chunk("world"), chunk(None, "stop")])
    async with scripted(handler) as url, client_for(url) as client:
        pieces = [p async for p in client.completion_stream("hi")]
        usage = client.usage
    assert "".join(pieces) == "hello world"
    assert (usage.rate_limit_hits, usage.retries, usage.failed_calls) == (1, 1, 0)


async def test_a_stream_cut_before_any_text_is_asked_again() -> None:
    # The first answer stops after an empty piece: no finish reason, no [DONE].
    handler = first_then([chunk("")], [chunk("whole"), chunk(None, "stop")])
    async with scripted(handler) as url, client_for(url) as client:
        pieces = [p async for p in client.completion_stream("hi")]
        usage = client.usage
    assert "".join(pieces) == "whole"
    assert (usage.retries, usage.calls, usage.failed_calls) == (1, 1, 0)


async def test_a_stream_cut_after_some_text_is_an_error_counted_as_failed() -> None:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await sse(request, [chunk("a fragm")], done=False)

    async with scripted(handler) as url, client_for(url) as client:
        pieces: list[str] = []
        with pytest.raises(LLMConnectionError, match="without a finish reason"):
            async for piece in client.completion_stream("hi"):
                pieces.append(piece)
        usage = client.usage
    assert pieces == ["a fragm"]
    assert (usage.calls, usage.failed_calls) == (0, 1)


# -- servers that omit usage, and error bodies of every shape ---------------------------------


async def test_replies_without_usage_settle_at_the_estimate_and_say_so() -> None:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.Response:
        return reply_json("fine", body["model"], usage=False)

    async with scripted(handler) as url, client_for(url) as client:
        ledger = BudgetLedger(max_tokens=50)
        sent = 0
        with pytest.raises(BudgetExhaustedError):
            for _ in range(5):
                await client.send(client.request("hello", max_tokens=40), ledger=ledger)
                sent += 1
        usage = client.usage
    # Each call settles at its estimate (prompt chars / 4 + 1, plus max_tokens): 42
    # tokens, so the second spends the 50 and the third is never sent.
    assert sent == 2
    assert (usage.calls, usage.estimated_calls) == (2, 2)
    assert usage.completion_tokens == 80 and usage.prompt_tokens == 2 * (len("hello") // 4 + 1)
    assert "estimated" in repr(usage)


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, {"detail": "Model 'm' not found, try one of a, b"}, "Model 'm' not found, try one of a, b"),
    (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required"}]},
     "messages: field required"),
    (400, {"error": "bad temperature"}, "bad temperature"),
    (400, {"message": "nope", "code": 7}, "nope"),
])
async def test_the_servers_own_error_message_is_kept(status: int, body: Any, expected: str) -> None:
    async def handler(request: web.Request, _: dict[str, Any]) -> web.Response:
        return web.json_response(body, status=status)

    async with scripted(handler) as url, client_for(url) as client:
        with pytest.raises(LLMError) as info:
            await client.completion("hi")
    assert f"request rejected ({status}): {expected}" in str(info.value)


async def test_a_plain_text_error_body_is_shown_as_a_bounded_snippet() -> None:
    async def handler(request: web.Request, _: dict[str, Any]) -> web.Response:
        return web.Response(text="<html>" + "upstream exploded " * 100 + "</html>", status=400)

    async with scripted(handler) as url, client_for(url) as client:
        with pytest.raises(LLMError) as info:
            await client.completion("hi")
    message = str(info.value)
    assert "upstream exploded" in message and len(message) < 400


async def test_a_refused_connection_fails_fast_naming_the_url() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()  # nothing listens there now
    notices: list[RetryNotice] = []
    async with client_for(url, on_retry=notices.append) as client:
        with pytest.raises(LLMConnectionError) as info:
            await client.completion("hi")
    message = str(info.value)
    assert url in message and "is the server running" in message
    assert "\n" not in message
    # Retried for a moment only: the waits it scheduled add up to under two seconds.
    assert sum(n.wait_s for n in notices) < 2.0


def test_rlm_limits_pace_the_clients_it_builds() -> None:
    from rlm import RLM

    rlm = RLM(model="root-m", recursive_model="sub-m", api_key="k", base_url="http://127.0.0.1:9/v1",
              limits={"sub-m": {"rpm": 60, "tpm": 90_000}, "root-m": {"rpm": 5}})
    try:
        sub, root = rlm.sub_client.limiter.pacer.state(), rlm.client.limiter.pacer.state()
    finally:
        rlm.close()
    assert (sub.rpm, sub.tpm, sub.rpm_from) == (60, 90_000, "given")
    assert (root.rpm, root.tpm) == (5, None)


async def test_a_batch_of_200_tasks_puts_more_than_two_default_widths_in_flight() -> None:
    from rlm import RLM

    def root(messages: list[dict[str, Any]]) -> str:
        return "```repl\nFINAL(llm_query('ECHO done'))\n```"

    with FakeLLMServer(root, latency=0.3) as srv:
        async with RLM(model="m", api_key="k", base_url=srv.url, sandbox="local") as rlm:
            results = await rlm.acompletion_batch([("ctx", f"q{i}") for i in range(200)],
                                                  max_concurrency=200, progress=False)
        peak = srv.peak_in_flight
    assert all(r.error is None for r in results)
    # Two clients at their default 64 each would cap the server at 128.
    assert peak > 128


def _rlm_cli(*argv: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "rlm.cli", *argv], capture_output=True,
                          text=True, timeout=120)


def test_cli_limit_flags_reach_the_clients(tmp_path: Any) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("some context")
    with FakeLLMServer() as srv:
        proc = _rlm_cli("run", "--context", str(ctx), "--query", "q", "--base-url", srv.url,
                        "--api-key", "k", "--sandbox", "local", "--model", "m", "--tpm", "50")
        requests = srv.requests
    # The root's first prompt alone is far over 50 tokens a minute: refused before sending.
    assert proc.returncode == 1
    assert "limit of 50 tokens per minute" in proc.stderr
    assert requests == 0


def test_cli_a_malformed_limit_is_a_usage_error(tmp_path: Any) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("x")
    proc = _rlm_cli("run", "--context", str(ctx), "--query", "q", "--api-key", "k",
                    "--limit", "gpt-5-mini=5000")
    assert proc.returncode == 2
    assert "a limit is MODEL=rpm:N,tpm:N" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_held_back_by_rate_limits_says_so_in_its_trajectory_and_live(closing: Any) -> None:
    from rlm_support import ROOT, make_rlm, repl

    from rlm.testing import Fault

    refused = 0

    def sub(messages: list[dict[str, Any]]) -> Any:
        nonlocal refused
        if refused < 3:
            refused += 1
            return Fault("429", retry_after_ms=50)
        return "ok"

    live: list[dict[str, Any]] = []
    code = "out = llm_query_batch(['a', 'b'])\nFINAL(out[0] + out[1])"
    with FakeLLMServer(sub, scripts={ROOT: [repl(code)]}) as srv:
        rlm = make_rlm(srv, closing, on_event=live.append)
        result = rlm.completion(context="x", query="q")
    assert result.answer == "okok"
    logged = [e for e in result.trajectory if e["type"] == "rate_limited"]
    assert len(logged) == 1
    assert logged[0]["role"] == "sub" and logged[0]["refusals"] == 3
    assert logged[0]["waited_s"] >= 0.15
    # Each retry was shown live as it happened, and kept out of the log.
    retries = [e for e in live if e["type"] == "retry"]
    assert len(retries) == 3 and all(e["refusal"] for e in retries)
    assert not any(e["type"] == "retry" for e in result.trajectory)
