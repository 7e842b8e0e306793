"""The faults a client test needs, as the official openai SDK and aiohttp see them, and the
command line's handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import aiohttp
import openai
import pytest

from rlm.testing import FakeLLMServer, Fault, spawn_fake_server


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_a_cut_stream_ends_after_one_chunk_without_finish_reason_or_done(
    server: FakeLLMServer,
) -> None:
    server.inject("cut")
    body = {"model": "m", "messages": user("ECHO a reply long enough for several chunks"),
            "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/chat/completions", json=body) as response:
            assert response.status == 200
            text = await response.text()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) == 2
    assert "[DONE]" not in text
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events)
    assert json.loads(events[1])["choices"][0]["delta"]["content"]


async def test_a_cut_reply_without_streaming_breaks_off_before_its_content_length(
    server: FakeLLMServer,
) -> None:
    server.inject("cut")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.url}/chat/completions", json={"model": "m", "messages": user("hi")}
        ) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_a_no_usage_fault_answers_without_usage(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("no_usage", count=2)
    reply = await sdk.chat.completions.create(model="m", messages=user("ECHO fine"))
    assert reply.choices[0].message.content == "fine"
    assert reply.usage is None
    stream = await sdk.chat.completions.create(
        model="m", messages=user("ECHO fine"), stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_detail_fault_sends_a_fastapi_style_body_with_its_status(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("detail", status=422, message="field 'messages' is required")
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await sdk.chat.completions.create(model="m", messages=user("hi"))
    assert caught.value.response.json() == {"detail": "field 'messages' is required"}


async def test_a_stream_error_fault_raises_inside_the_sdk_stream_after_the_first_chunk(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("stream_error")
    stream = await sdk.chat.completions.create(
        model="m", messages=user("ECHO some text"), stream=True
    )
    seen = 0
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            seen += 1
    # The role chunk and the first content chunk arrive before the error event.
    assert seen == 2
    assert "Rate limit" in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "rate_limit_exceeded"


async def test_any_fault_may_carry_extra_headers(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.inject("429", headers={"llm_provider-retry-after": "0.2", "retry-after": "90"})
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="m", messages=user("hi"))
    assert caught.value.response.headers["llm_provider-retry-after"] == "0.2"
    assert caught.value.response.headers["retry-after"] == "90"


async def test_a_responder_may_return_an_answering_fault_with_its_text(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    server.responder = lambda messages: Fault("no_usage", message="bare")
    reply = await sdk.chat.completions.create(model="m", messages=user("x"))
    assert (reply.choices[0].message.content, reply.usage) == ("bare", None)


def test_fault_options_that_do_not_apply_are_refused() -> None:
    with pytest.raises(ValueError, match="status"):
        Fault("429", status=500)
    with pytest.raises(ValueError, match="headers"):
        Fault("drop", headers={"x": "y"})


async def test_a_forced_function_call_is_answered_with_tool_calls_from_the_json_responder() -> (
    None
):
    def extract(messages: list[dict[str, Any]], response_format: dict[str, Any]) -> Any:
        return {"city": "Paris", "schema_name": response_format["json_schema"]["name"]}

    tool = {"type": "function", "function": {"name": "pick", "parameters": {"type": "object"}}}
    async with FakeLLMServer(json_responder=extract) as server:
        async with openai.AsyncOpenAI(
            base_url=server.url, api_key="x", http_client=openai.DefaultAioHttpClient()
        ) as sdk:
            reply = await sdk.chat.completions.create(
                model="m", messages=user("which?"), tools=[tool],
                tool_choice={"type": "function", "function": {"name": "pick"}},
            )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "pick"
    assert json.loads(call.function.arguments) == {"city": "Paris", "schema_name": "pick"}


# -- the command line ------------------------------------------------------------------


def test_fault_rate_1_serves_only_faults_and_prints_no_traceback() -> None:
    with spawn_fake_server(extra_args=["--fault-rate", "1.0", "--fault-kinds", "500"]) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        with client, pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=user("x"))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--fault-rate", "1.5"], "--fault-rate must be between 0 and 1"),
        (["--fault-kinds", "404"], "unknown fault kind '404'"),
        (["--limit", "m:rps=fast"], "is not MODEL:KEY=NUMBER"),
        (["--limit", "m:rpn=5"], "unknown limit 'rpn'"),
        (["--latency", "-1"], "--latency must be >= 0"),
        (["--port", "99999"], "--port must be 0 to 65535"),
    ],
)
def test_bad_command_line_input_prints_one_line_and_exits_2(args: list[str], says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlm.testing", *args],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("python -m rlm.testing: error:")
