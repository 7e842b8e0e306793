"""FakeLLMServer speaks Anthropic's Messages API: the official anthropic SDK against it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest

from rlm.testing import FakeLLMServer

HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


@pytest.fixture
async def claude(server: FakeLLMServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(api_key="k", base_url=server.root_url, max_retries=0)
    async with client:
        yield client


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def post(server: FakeLLMServer, body: dict[str, Any], headers: dict[str, str]) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.root_url}/v1/messages", json=body, headers=headers
        ) as response:
            return response.status, dict(response.headers), await response.text()


async def test_the_sdk_gets_a_message_with_its_usage_and_the_system_prompt_counts(
    server: FakeLLMServer, claude: anthropic.AsyncAnthropic
) -> None:
    message = await claude.messages.create(
        model="claude-fake", max_tokens=100, system="Be terse.", messages=user("ECHO hi there")
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "hi there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == (len("Be terse.") + len("ECHO hi there")) // 4
    assert message.usage.output_tokens == len("hi there") // 4
    entry = server.requests_log[-1]
    assert (entry["protocol"], entry["path"], entry["model"]) == (
        "anthropic", "/v1/messages", "claude-fake",
    )
    assert entry["params"]["system"] == "Be terse."


async def test_a_request_without_a_key_is_a_401_authentication_error(
    server: FakeLLMServer,
) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": user("hi")}
    status, _, text = await post(server, body, {"anthropic-version": "2023-06-01"})
    assert status == 401
    assert json.loads(text)["error"]["type"] == "authentication_error"
    assert server.requests == 0


async def test_a_request_without_anthropic_version_is_a_400(server: FakeLLMServer) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": user("hi")}
    status, _, text = await post(server, body, {"x-api-key": "k"})
    assert status == 400
    error = json.loads(text)
    assert error["type"] == "error"
    assert "anthropic-version" in error["error"]["message"]


async def test_max_tokens_is_required(server: FakeLLMServer) -> None:
    status, _, text = await post(server, {"model": "m", "messages": user("hi")}, HEADERS)
    assert status == 400
    assert json.loads(text)["error"]["type"] == "invalid_request_error"


async def test_a_cache_control_prefix_is_written_once_then_read_by_the_same_model(
    claude: anthropic.AsyncAnthropic,
) -> None:
    system = [{"type": "text", "text": "s" * 6000, "cache_control": {"type": "ephemeral"}}]

    async def ask(model: str) -> anthropic.types.Usage:
        reply = await claude.messages.create(
            model=model, max_tokens=10, system=system, messages=user("ECHO q" + "x" * 394)
        )
        return reply.usage

    first, second, other = await ask("c"), await ask("c"), await ask("d")
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (1500, 0)
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, 1500)
    assert second.input_tokens == 100
    assert other.cache_read_input_tokens == 0


async def test_a_growing_history_reads_the_previous_turns_breakpoint_from_cache(
    claude: anthropic.AsyncAnthropic,
) -> None:
    def turn(text: str, mark: bool) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "text", "text": text}
        if mark:
            block["cache_control"] = {"type": "ephemeral"}
        return {"role": "user", "content": [block]}

    history = [turn("a" * 8000, True)]
    await claude.messages.create(model="c", max_tokens=10, messages=history)
    history = [turn("a" * 8000, False), {"role": "assistant", "content": "b" * 400},
               turn("c" * 400, True)]
    second = await claude.messages.create(model="c", max_tokens=10, messages=history)
    assert second.usage.cache_read_input_tokens == 2000
    assert second.usage.cache_creation_input_tokens == 200
    assert second.usage.input_tokens == 0


async def test_streaming_events_assemble_into_the_message_through_the_sdk(
    server: FakeLLMServer, claude: anthropic.AsyncAnthropic
) -> None:
    text = "a streamed reply long enough to come in several deltas"
    async with claude.messages.stream(
        model="m", max_tokens=100, messages=user(f"ECHO {text}")
    ) as stream:
        assembled = await stream.get_final_text()
        final = await stream.get_final_message()
    assert assembled == text
    assert final.usage.output_tokens == len(text) // 4
    assert final.stop_reason == "end_turn"
    status, headers, raw = await post(
        server, {"model": "m", "max_tokens": 5, "stream": True, "messages": user("ECHO x")},
        HEADERS,
    )
    names = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    assert headers["Content-Type"].startswith("text/event-stream")


async def test_a_429_is_a_rate_limit_error_with_retry_after(
    server: FakeLLMServer, claude: anthropic.AsyncAnthropic
) -> None:
    server.inject("429", retry_after=3)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await claude.messages.create(model="m", max_tokens=5, messages=user("hi"))
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_a_529_is_an_overloaded_error(
    server: FakeLLMServer, claude: anthropic.AsyncAnthropic
) -> None:
    server.inject("529")
    with pytest.raises(anthropic.APIStatusError) as caught:
        await claude.messages.create(model="m", max_tokens=5, messages=user("hi"))
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_an_error_event_inside_a_stream_reaches_the_sdk_as_an_error(
    server: FakeLLMServer, claude: anthropic.AsyncAnthropic
) -> None:
    server.inject("stream_error", status=529)
    with pytest.raises(anthropic.APIError) as caught:
        async with claude.messages.stream(
            model="m", max_tokens=50, messages=user("ECHO some words here")
        ) as stream:
            await stream.get_final_text()
    assert "Overloaded" in str(caught.value)


async def test_limits_report_anthropic_ratelimit_headers_with_rfc3339_resets() -> None:
    async with FakeLLMServer(limits={"c": {"rpm": 50, "input_tpm": 10_000}}) as server:
        status, headers, _ = await post(
            server, {"model": "c", "max_tokens": 5, "messages": user("x" * 400)}, HEADERS
        )
    assert status == 200
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == str(10_000 - 100)
    assert headers["anthropic-ratelimit-input-tokens-reset"].endswith("Z")
    assert "T" in headers["anthropic-ratelimit-requests-reset"]


async def test_a_refused_request_is_a_rate_limit_error_with_retry_after() -> None:
    async with FakeLLMServer(limits={"c": {"rps": 1, "burst": 1}}) as server:
        async with anthropic.AsyncAnthropic(
            api_key="k", base_url=server.root_url, max_retries=0
        ) as claude:
            await claude.messages.create(model="c", max_tokens=5, messages=user("a"))
            with pytest.raises(anthropic.RateLimitError) as caught:
                await claude.messages.create(model="c", max_tokens=5, messages=user("a"))
        assert server.stats()["models"]["c"]["rate_limited"] == 1
    assert caught.value.response.headers["retry-after"] == "1"


async def test_a_forced_tool_is_answered_with_a_tool_use_block_from_the_json_responder() -> None:
    seen: list[dict[str, Any]] = []

    def extract(messages: list[dict[str, Any]], response_format: dict[str, Any]) -> Any:
        seen.append(response_format)
        return {"count": len(messages)}

    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    async with FakeLLMServer(json_responder=extract) as server:
        async with anthropic.AsyncAnthropic(api_key="k", base_url=server.root_url) as claude:
            reply = await claude.messages.create(
                model="m", max_tokens=50, system="sys", messages=user("how many?"),
                tools=[{"name": "answer", "input_schema": schema}],
                tool_choice={"type": "tool", "name": "answer"},
            )
    block = reply.content[0]
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("answer", {"count": 2})
    assert reply.stop_reason == "tool_use"
    assert seen == [{"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}]


async def test_count_tokens_reports_the_prompts_input_tokens(
    claude: anthropic.AsyncAnthropic,
) -> None:
    counted = await claude.messages.count_tokens(model="m", messages=user("x" * 400))
    assert counted.input_tokens == 100
