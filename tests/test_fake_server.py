"""FakeLLMServer over real sockets: what a client of the fake model can observe.

Clients are the official openai SDK on its aiohttp transport (what rlm itself uses),
plain aiohttp, and raw sockets where the HTTP framing itself is the point.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from pydantic import BaseModel

from rlm.testing import (
    FakeLLMServer,
    Fault,
    echo_responder,
    fetch_stats,
    reset_stats,
    spawn_fake_server,
)


@pytest.fixture
async def sdk(server: FakeLLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK on its aiohttp transport, without retries so faults surface."""
    client = openai.AsyncOpenAI(
        base_url=server.url,
        api_key="x",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    )
    async with client:
        yield client


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def post_chat(
    session: aiohttp.ClientSession, server: FakeLLMServer, body: dict[str, Any]
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"{server.url}/chat/completions", json=body) as response:
        return response.status, dict(response.headers), await response.read()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition about another thread's server until it holds or time runs out."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def chat_request(content: str, *, close: bool = False) -> bytes:
    body = json.dumps({"model": "fake-model", "messages": user(content)}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


# -- answers -----------------------------------------------------------------------


def test_echo_responder_answers_echo_prompts_with_their_rest_and_others_with_a_preview() -> None:
    history = [
        {"role": "user", "content": "ECHO old"},
        {"role": "assistant", "content": "old"},
        {"role": "user", "content": "ECHO 1"},
    ]
    assert echo_responder(history) == "1"
    long_question = "What is the capital of France? " * 5
    assert echo_responder(user(long_question)) == f"fake answer to: {long_question[:60]}"


async def test_chat_completion_round_trip_through_the_sdk_reports_usage(
    sdk: openai.AsyncOpenAI,
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "ECHO forty-two"},
    ]
    completion = await sdk.chat.completions.create(model="fake-model", messages=messages)
    assert completion.object == "chat.completion"
    assert completion.model == "fake-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "forty-two"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    prompt_chars = len("You are terse.") + len("ECHO forty-two")
    assert completion.usage.prompt_tokens == prompt_chars // 4
    assert completion.usage.completion_tokens == len("forty-two") // 4
    assert completion.usage.total_tokens == prompt_chars // 4 + len("forty-two") // 4


async def test_streaming_with_include_usage_assembles_the_text_and_ends_with_usage(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    text = "a streamed reply long enough to be split into several pieces"
    stream = await sdk.chat.completions.create(
        model="fake-model",
        messages=user(f"ECHO {text}"),
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1
    assert usage is not None
    assert usage.completion_tokens == len(text) // 4
    assert usage.prompt_tokens == len(f"ECHO {text}") // 4
    assert server.streams == 1


async def test_models_endpoint_lists_the_default_and_the_scripted_models() -> None:
    async with FakeLLMServer(model="base", scripts={"root": ["x"]}) as server:
        async with openai.AsyncOpenAI(
            base_url=server.url, api_key="x", http_client=openai.DefaultAioHttpClient()
        ) as client:
            names = [model.id async for model in client.models.list()]
    assert names == ["base", "root"]


async def test_json_schema_response_format_returns_the_responder_text_as_is() -> None:
    class Answer(BaseModel):
        city: str
        population: int

    def json_responder(messages: list[dict[str, Any]]) -> str:
        return json.dumps({"city": "Paris", "population": 2100000})

    async with FakeLLMServer(json_responder) as server:
        async with openai.AsyncOpenAI(
            base_url=server.url, api_key="x", http_client=openai.DefaultAioHttpClient()
        ) as client:
            parsed = await client.chat.completions.parse(
                model="fake-model", messages=user("Which city?"), response_format=Answer
            )
        params = server.requests_log[-1]["params"]
    assert parsed.choices[0].message.parsed == Answer(city="Paris", population=2100000)
    assert params["response_format"]["type"] == "json_schema"


async def test_scripts_answer_by_assistant_turn_count_so_interleaved_conversations_share_one() -> (
    None
):
    script = ["turn 0", "turn 1", lambda messages: f"turn 2 after {len(messages)} messages"]
    async with (
        FakeLLMServer(scripts={"root": script}) as server,
        aiohttp.ClientSession() as session,
    ):

        async def say(history: list[dict[str, Any]], model: str = "root") -> str:
            status, _, body = await post_chat(
                session, server, {"model": model, "messages": history}
            )
            assert status == 200
            reply: str = json.loads(body)["choices"][0]["message"]["content"]
            history.append({"role": "assistant", "content": reply})
            history.append({"role": "user", "content": "go on"})
            return reply

        first = user("conversation A")
        second = user("conversation B")
        assert await say(first) == "turn 0"
        assert await say(first) == "turn 1"
        assert await say(second) == "turn 0"
        assert await say(first) == "turn 2 after 5 messages"
        assert await say(second) == "turn 1"
        # Past the end of the script the last item keeps answering.
        assert await say(first) == "turn 2 after 7 messages"
        # Models without a script go to the responder.
        assert await say(user("ECHO free"), model="other") == "free"


async def test_a_responder_may_return_a_fault() -> None:
    async with FakeLLMServer(lambda messages: Fault("503")) as faulty:
        async with aiohttp.ClientSession() as session:
            status, _, body = await post_chat(session, faulty, {"messages": user("hi")})
        assert faulty.faults_served == 1
    assert status == 503
    assert json.loads(body)["error"]["type"] == "server_error"


async def test_a_responder_that_raises_becomes_a_500_naming_the_exception() -> None:
    def broken(messages: list[dict[str, Any]]) -> str:
        raise KeyError("missing")

    async with FakeLLMServer(broken) as server, aiohttp.ClientSession() as session:
        status, _, body = await post_chat(session, server, {"messages": user("hi")})
    assert status == 500
    assert "KeyError" in json.loads(body)["error"]["message"]


# -- faults ------------------------------------------------------------------------


async def test_injected_429_carries_retry_after_headers_and_an_openai_error(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("429", retry_after=2, retry_after_ms=1500)
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="fake-model", messages=user("hi"))
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["retry-after-ms"] == "1500"
    assert caught.value.code == "rate_limit_exceeded"
    # The queue held one fault: the next request is answered normally.
    completion = await sdk.chat.completions.create(model="fake-model", messages=user("ECHO ok"))
    assert completion.choices[0].message.content == "ok"
    assert server.faults_served == 1


async def test_429_without_retry_after_sends_no_retry_after_header(server: FakeLLMServer) -> None:
    server.inject("429")
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post_chat(session, server, {"messages": user("hi")})
    assert status == 429
    assert "Retry-After" not in headers
    assert "retry-after-ms" not in headers


@pytest.mark.parametrize("kind", ["500", "503"])
async def test_injected_server_errors_have_their_status_and_an_openai_error_body(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI, kind: str
) -> None:
    server.inject(kind)
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(model="fake-model", messages=user("hi"))
    assert caught.value.status_code == int(kind)
    error = caught.value.response.json()["error"]
    assert set(error) >= {"message", "type", "code"}


async def test_injected_faults_are_served_first_in_first_out_for_count_requests(
    server: FakeLLMServer,
) -> None:
    server.inject("503", count=2)
    server.inject("500")
    async with aiohttp.ClientSession() as session:
        statuses = [
            (await post_chat(session, server, {"messages": user("ECHO x")}))[0] for _ in range(4)
        ]
    assert statuses == [503, 503, 500, 200]
    assert server.faults_served == 3


async def test_hang_never_answers_so_the_client_times_out(server: FakeLLMServer) -> None:
    server.inject("hang")
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            await post_chat(session, server, {"messages": user("hi")})
        assert server.in_flight == 1
    # The client gave up and closed its socket, which ends the request server-side.
    assert await eventually(lambda: server.in_flight == 0)


async def test_hang_through_the_sdk_ends_in_its_timeout_error(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("hang")
    with pytest.raises(openai.APITimeoutError):
        await sdk.with_options(timeout=0.3).chat.completions.create(
            model="fake-model",
            messages=user("hi"),
        )


async def test_drop_closes_the_connection_without_a_response(server: FakeLLMServer) -> None:
    server.inject("drop")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post_chat(session, server, {"messages": user("hi")})
    assert server.faults_served == 1


async def test_drop_reaches_the_sdk_as_a_connection_error(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("drop")
    with pytest.raises(openai.APIConnectionError):
        await sdk.chat.completions.create(model="fake-model", messages=user("hi"))


async def test_malformed_is_a_200_json_response_that_does_not_decode(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("malformed")
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post_chat(session, server, {"messages": user("hi")})
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    server.inject("malformed")
    with pytest.raises(json.JSONDecodeError):
        await sdk.chat.completions.create(model="fake-model", messages=user("hi"))


def test_unknown_fault_kinds_are_refused_with_the_valid_ones_named() -> None:
    with pytest.raises(ValueError, match="hang"):
        Fault("timeout")
    with pytest.raises(ValueError, match="429"):
        Fault("500", retry_after=1)


# -- concurrency and counters ---------------------------------------------------------


async def test_latency_overlaps_concurrent_requests_to_a_peak_of_50_in_flight(
    server: FakeLLMServer,
) -> None:
    server.latency = 0.3
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(
            *(post_chat(session, server, {"messages": user(f"ECHO {i}")}) for i in range(50))
        )
    answers = [json.loads(body)["choices"][0]["message"]["content"] for _, _, body in results]
    assert answers == [str(i) for i in range(50)]
    assert server.peak_in_flight == 50
    assert server.in_flight == 0
    assert server.requests == 50


async def test_a_latency_range_also_holds_requests_concurrently(server: FakeLLMServer) -> None:
    server.latency = (0.2, 0.4)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(
            *(post_chat(session, server, {"messages": user("hi")}) for _ in range(20))
        )
    assert server.peak_in_flight == 20


def test_invalid_latency_is_refused() -> None:
    with pytest.raises(ValueError):
        FakeLLMServer(latency=-1)
    with pytest.raises(ValueError):
        FakeLLMServer(latency=(0.5, 0.1))


async def test_reset_counters_zeroes_the_counters_and_clears_the_log(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("500")
    with pytest.raises(openai.InternalServerError):
        await sdk.chat.completions.create(model="fake-model", messages=user("a"))
    stream = await sdk.chat.completions.create(
        model="fake-model",
        messages=user("b"),
        stream=True,
    )
    async for _ in stream:
        pass
    assert server.stats()["requests"] == 2
    assert server.stats()["streams"] == 1
    assert server.stats()["faults_served"] == 1
    assert len(server.requests_log) == 2

    server.reset_counters()

    stats = server.stats()
    assert {k: stats[k] for k in ("requests", "in_flight", "peak_in_flight", "streams")} == {
        "requests": 0,
        "in_flight": 0,
        "peak_in_flight": 0,
        "streams": 0,
    }
    assert stats["faults_served"] == 0
    assert server.requests_log == []


async def test_requests_log_records_model_messages_params_and_authorization(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    await sdk.chat.completions.create(model="m1", messages=user("hello"), temperature=0.5)
    async with aiohttp.ClientSession() as session:
        await post_chat(session, server, {"model": "m2", "messages": user("bye")})
    first, second = server.requests_log
    assert first["model"] == "m1"
    assert first["messages"] == user("hello")
    assert first["params"]["temperature"] == 0.5
    assert first["has_authorization"] is True
    assert second["model"] == "m2"
    assert second["has_authorization"] is False


async def test_stats_endpoints_report_and_reset_the_counters_over_http(
    server: FakeLLMServer,
) -> None:
    async with aiohttp.ClientSession() as session:
        await post_chat(session, server, {"messages": user("hi")})
    stats = await asyncio.to_thread(fetch_stats, server.url)
    assert stats["requests"] == 1
    assert stats["peak_in_flight"] == 1
    await asyncio.to_thread(reset_stats, server.url)
    assert server.requests == 0


# -- HTTP framing ------------------------------------------------------------------


async def test_unknown_path_is_a_404_and_a_bad_body_a_400_both_json(server: FakeLLMServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/embeddings") as response:
            assert response.status == 404
            assert "error" in await response.json()
        async with session.post(f"{server.url}/chat/completions", data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert server.requests == 0


def test_pipelined_requests_on_one_connection_are_answered_in_order(
    server: FakeLLMServer,
) -> None:
    server.latency = 0.05
    # Three requests in one write; the last asks the server to close afterwards.
    reply = raw_exchange(
        server.port,
        chat_request("ECHO first")
        + chat_request("ECHO second")
        + chat_request("ECHO third", close=True),
    )
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    positions = [
        reply.index(f'"content":"{word}"'.encode()) for word in ("first", "second", "third")
    ]
    assert positions == sorted(positions)
    assert reply.count(b"Connection: close") == 1
    assert server.connections == 1


def test_a_long_pipeline_without_latency_is_answered_completely_and_in_order(
    server: FakeLLMServer,
) -> None:
    count = 2000
    requests = b"".join(chat_request(f"ECHO n{i}") for i in range(count - 1))
    reply = raw_exchange(server.port, requests + chat_request(f"ECHO n{count - 1}", close=True))
    contents = [part.split(b'"', 1)[0] for part in reply.split(b'"content":"')[1:]]
    assert contents == [f"n{i}".encode() for i in range(count)]


def test_a_chunked_request_body_is_decoded(server: FakeLLMServer) -> None:
    body = json.dumps({"messages": user("ECHO chunked")}).encode()
    half = len(body) // 2
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half,
        body[:half],
        len(body) - half,
        body[half:],
    )
    reply = raw_exchange(
        server.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunked,
    )
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert b'"content":"chunked"' in reply


# -- lifecycle ---------------------------------------------------------------------


async def test_stop_closes_hung_connections_and_is_idempotent() -> None:
    server = FakeLLMServer().start()
    server.inject("hang")
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        request = asyncio.create_task(post_chat(session, server, {"messages": user("hi")}))
        assert await eventually(lambda: server.in_flight == 1)
        await asyncio.to_thread(server.stop)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await request
    server.stop()
    assert server.in_flight == 0
    assert server.open_connections == 0


def test_shutdown_leaves_no_pending_tasks_closed_loop_errors_or_resource_warnings() -> None:
    script = textwrap.dedent(
        """
        import asyncio, gc, json, socket
        from rlm.testing import FakeLLMServer

        def open_hung_request(server):
            sock = socket.create_connection(("127.0.0.1", server.port))
            body = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
            return sock

        server = FakeLLMServer(latency=5).start()
        server.inject("hang")
        socks = [open_hung_request(server) for _ in range(3)]
        while server.in_flight < 3:
            pass
        server.stop()
        for sock in socks:
            sock.close()

        async def on_my_loop():
            async with FakeLLMServer(latency=5) as server:
                sock = open_hung_request(server)
                while server.in_flight < 1:
                    await asyncio.sleep(0.01)
            sock.close()

        asyncio.run(on_my_loop())
        gc.collect()
        print("clean")
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "clean", result.stderr
    # Debug mode also logs slow callbacks on a busy machine; only these markers are faults.
    for marker in (
        "Task was destroyed",
        "Event loop is closed",
        "ResourceWarning",
        "unclosed",
        "Traceback",
    ):
        assert marker not in result.stderr, result.stderr


def test_subprocess_mode_serves_chat_and_reports_stats_over_http() -> None:
    with spawn_fake_server(latency=0.05) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")

        async def ask_concurrently() -> list[str]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

                async def ask(i: int) -> str:
                    body = {"model": "fake-model", "messages": user(f"ECHO {i}")}
                    async with session.post(f"{url}/chat/completions", json=body) as response:
                        content: str = (await response.json())["choices"][0]["message"]["content"]
                        return content

                return await asyncio.gather(*(ask(i) for i in range(10)))

        assert asyncio.run(ask_concurrently()) == [str(i) for i in range(10)]
        stats = fetch_stats(url)
        assert stats["requests"] == 10
        assert stats["peak_in_flight"] == 10
        reset_stats(url)
        assert fetch_stats(url)["requests"] == 0


async def test_a_json_responder_sees_the_response_format_and_its_value_is_sent_as_json() -> None:
    seen: list[dict[str, Any]] = []

    def answer(messages: list[dict[str, Any]], response_format: dict[str, Any]) -> Any:
        seen.append(response_format)
        return {"count": len(messages[-1]["content"])}

    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    async with FakeLLMServer(json_responder=answer) as srv, aiohttp.ClientSession() as session:
        status, _, raw = await post_chat(
            session, srv, {"model": "m", "messages": user("four"), "response_format": response_format}
        )
        plain_status, _, plain = await post_chat(session, srv, {"model": "m", "messages": user("ECHO x")})
    assert status == 200
    assert json.loads(json.loads(raw)["choices"][0]["message"]["content"]) == {"count": 4}
    assert seen == [response_format]
    # A request without response_format still goes to the plain responder.
    assert (plain_status, json.loads(plain)["choices"][0]["message"]["content"]) == (200, "x")


async def test_a_server_without_structured_output_refuses_response_format_with_a_400() -> None:
    body = {"model": "m", "messages": user("hi"), "response_format": {"type": "json_schema"}}
    async with FakeLLMServer(response_format=False) as srv, aiohttp.ClientSession() as session:
        status, _, raw = await post_chat(session, srv, body)
        assert srv.in_flight == 0
    error = json.loads(raw)["error"]
    assert status == 400
    assert error["param"] == "response_format"
    assert "response_format" in error["message"]


def test_a_connection_that_asks_for_another_route_is_handed_over_in_order(
    server: FakeLLMServer,
) -> None:
    # Chat completions take the fast path; the models request hands the connection to
    # aiohttp, which answers it and the chat request pipelined after it.
    models = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = raw_exchange(
        server.port,
        chat_request("ECHO before") + models + chat_request("ECHO after", close=True),
    )
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    positions = [reply.index(marker) for marker in
                 (b'"content":"before"', b'"object":"list"', b'"content":"after"')]
    assert positions == sorted(positions)
    assert server.connections == 1
    assert server.requests == 2


async def test_without_the_fast_path_aiohttp_serves_chat_completions_the_same_way() -> None:
    async with FakeLLMServer(fast_path=False) as srv, aiohttp.ClientSession() as session:
        status, _, body = await post_chat(session, srv, {"messages": user("ECHO same")})
        srv.inject("429", retry_after=1)
        limited, headers, _ = await post_chat(session, srv, {"messages": user("x")})
    assert (status, json.loads(body)["choices"][0]["message"]["content"]) == (200, "same")
    assert (limited, headers["Retry-After"]) == (429, "1")
    assert srv.requests == 2
