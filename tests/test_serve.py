"""``rlm serve`` as a real subprocess, driven by the openai SDK over real HTTP.

FakeLLMServer plays the upstream: a scripted root model that chunks the context and
fans out with ``llm_query_batch``, and a sub-model that reads each chunk. A second
root script (``rlm:root-hang``) asks sub-queries the upstream never answers, to hold a
run in flight for the queue, disconnect and cancellation tests.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel
from rlm_support import wait_until
from serve_support import (
    FOUND_SCHEMA,
    HANG_ROOT,
    LOOP_FINAL_ROOT,
    LOOP_ROOT,
    NEEDLE,
    QUERY,
    ROOT,
    SUB,
    TYPED_ROOT,
    needle_messages,
    rlm_server,
    serve_process,
)

from rlm.testing import FakeLLMServer

KEY = "test-serve-key"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def serve_url(upstream: FakeLLMServer, allowed: Path, logs: Path) -> Iterator[str]:
    with serve_process(upstream.url, KEY, "--log-dir", str(logs), "--allow-dir", str(allowed),
                       "--max-body-mb", "0.5", "--max-running", "1", "--max-queue", "0",
                       "--price", f"{ROOT}=100,100", "--price", f"{SUB}=100,100") as url:
        yield url


@pytest.fixture
def client(serve_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=serve_url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def test_needle_answered_through_the_openai_sdk(client: openai.OpenAI, upstream: FakeLLMServer,
                                                logs: Path) -> None:
    upstream.reset_counters()
    reply = client.chat.completions.create(model="rlm", messages=needle_messages())
    assert reply.choices[0].message.content == NEEDLE
    assert reply.choices[0].finish_reason == "stop"
    meta = reply.model_extra["rlm"]
    assert meta["stopped_reason"] == "final"
    assert meta["iterations"] == 2
    assert meta["sub_calls"] == 6  # 3,000 lines in chunks of 500
    assert reply.usage is not None
    root, sub = meta["usage"]["root"], meta["usage"]["sub"]
    assert reply.usage.total_tokens == root["total_tokens"] + sub["total_tokens"] > 0
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == (
        root["cached_input_tokens"] + sub["cached_input_tokens"])
    assert Path(meta["log_path"]).parent == logs
    assert Path(meta["log_path"]).read_text(encoding="utf-8").count('"type": "cell"') == 2
    # The root model never saw the context, only its description (type, size, head).
    root_prompts = json.dumps([r["messages"] for r in upstream.requests_log if r["model"] == ROOT])
    assert "nothing to see on line 2999" not in root_prompts and "3,000 lines" in root_prompts


def test_needle_streamed_with_progress_then_answer_then_finish(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="rlm", messages=needle_messages(), stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == NEEDLE
    progress = [c.model_extra["rlm"] for c in chunks[:-1] if c.model_extra.get("rlm")]
    kinds = [p["event"] for p in progress]
    assert "root_reply" in kinds and "cell_result" in kinds
    assert any(p["event"] == "subcalls" and p["done"] == p["total"] == 6 for p in progress)
    answer_at = next(i for i, c in enumerate(chunks) if c.choices[0].delta.content == NEEDLE)
    assert all(c.model_extra.get("rlm", {}).get("event") is None for c in chunks[answer_at:])
    finish = chunks[-1]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.model_extra["rlm"]["sub_calls"] == 6


def test_the_plain_streaming_loop_reads_choice_zero_of_every_chunk(client: openai.OpenAI) -> None:
    # The loop most code copies from the OpenAI docs: without stream_options it must never
    # meet a chunk with no choices (OpenAI sends that usage chunk only when asked).
    pieces = []
    for ch in client.chat.completions.create(model="rlm", messages=needle_messages(), stream=True):
        pieces.append(ch.choices[0].delta.content)
    assert "".join(p for p in pieces if p) == NEEDLE


def test_include_usage_ends_the_stream_with_a_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="rlm", messages=needle_messages(), stream=True,
                                                 stream_options={"include_usage": True}))
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None
    meta = finish.model_extra["rlm"]["usage"]
    assert usage.usage.total_tokens == meta["total"]["total_tokens"] > 0


def test_progress_can_ride_in_the_content_for_chat_front_ends(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="rlm", messages=needle_messages(), stream=True, extra_body={"rlm": {"progress": "content"}}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "> sub-queries 6/6" in content
    assert content.endswith("\n" + NEEDLE)


class Found(BaseModel):
    passphrase: str
    chunks: int


def test_response_format_gets_a_validated_typed_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(model=f"rlm:{TYPED_ROOT}", messages=needle_messages(),
                                          response_format=Found)
    assert reply.choices[0].message.parsed == Found(passphrase=NEEDLE, chunks=6)
    assert reply.model_extra["rlm"]["output"] == {"passphrase": NEEDLE, "chunks": 6}


def test_json_object_response_format_answers_with_a_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=f"rlm:{TYPED_ROOT}", messages=needle_messages(),
                                           response_format={"type": "json_object"})
    assert json.loads(reply.choices[0].message.content or "") == {"passphrase": NEEDLE, "chunks": 6}


FIND_TOOL = {"type": "function", "function": {"name": "report_found", "description": "Report it.",
                                               "parameters": FOUND_SCHEMA}}
OTHER_TOOL = {"type": "function", "function": {"name": "give_up", "parameters": {"type": "object"}}}
FORCED = {"type": "function", "function": {"name": "report_found"}}


def test_a_forced_tool_choice_is_answered_with_that_tool_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=f"rlm:{TYPED_ROOT}", messages=needle_messages(),
                                           tools=[OTHER_TOOL, FIND_TOOL], tool_choice=FORCED)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "report_found"
    assert json.loads(call.function.arguments) == {"passphrase": NEEDLE, "chunks": 6}


def test_a_forced_tool_call_streams_as_a_tool_call_delta(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=f"rlm:{TYPED_ROOT}", messages=needle_messages(),
                                                 stream=True, tools=[FIND_TOOL], tool_choice="required"))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "report_found")]
    assert json.loads(calls[0].function.arguments or "") == {"passphrase": NEEDLE, "chunks": 6}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(("tools", "choice", "needle"), [
    ([FIND_TOOL], "auto", "names one function"),
    ([FIND_TOOL], None, "names one function"),
    ([FIND_TOOL, OTHER_TOOL], "required", "names one function"),
    ([FIND_TOOL], {"type": "function", "function": {"name": "missing"}}, "not in 'tools'"),
    ([{"type": "function"}], FORCED, "'tools' must be a list"),
])
def test_tool_use_an_rlm_cannot_serve_is_a_400(client: openai.OpenAI, tools: list[Any], choice: Any,
                                                needle: str) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="rlm", messages=needle_messages(), tools=tools, **extra)
    assert needle in info.value.message


def test_a_forced_tool_and_a_response_format_together_are_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="rlm", messages=needle_messages(), tools=[FIND_TOOL],
                                       tool_choice=FORCED, response_format={"type": "json_object"})
    assert "one answer format" in info.value.message


def test_the_iteration_limit_never_serves_the_root_models_code_as_the_answer(
    client: openai.OpenAI,
) -> None:
    reply = client.chat.completions.create(model=f"rlm:{LOOP_ROOT}", messages=needle_messages())
    assert reply.choices[0].message.content == ""
    assert reply.choices[0].finish_reason == "length"
    assert reply.model_extra["rlm"]["stopped_reason"] == "max_iterations"
    chunks = list(client.chat.completions.create(model=f"rlm:{LOOP_ROOT}", messages=needle_messages(),
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_iteration_limit_serves_a_final_given_in_the_last_turn(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=f"rlm:{LOOP_FINAL_ROOT}", messages=needle_messages())
    assert reply.choices[0].message.content == "my best guess"
    assert reply.choices[0].finish_reason == "length"
    assert reply.model_extra["rlm"]["stopped_reason"] == "max_iterations"


def test_a_schema_in_extra_body_works_and_a_broken_one_is_400(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=f"rlm:{TYPED_ROOT}", messages=needle_messages(),
                                           extra_body={"rlm": {"schema": FOUND_SCHEMA}})
    assert json.loads(reply.choices[0].message.content or "") == {"passphrase": NEEDLE, "chunks": 6}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="rlm", messages=needle_messages(),
                                       extra_body={"rlm": {"schema": {"type": 12}}})
    assert "not a valid JSON Schema" in info.value.message


@pytest.mark.parametrize("hostile", [
    {"type": "string", "pattern": "^(a+)+$"},
    {"type": "object", "patternProperties": {"^(a|a)*$": {"type": "string"}}},
    {"$ref": "https://example.invalid/schema.json"},
])
def test_a_schema_that_would_run_client_regexes_in_the_host_is_400(
    client: openai.OpenAI, hostile: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="rlm", messages=needle_messages(),
                                       extra_body={"rlm": {"schema": hostile}})
    assert "not supported" in info.value.message


def test_a_spent_budget_without_an_answer_is_402_with_the_run_metadata(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="rlm", messages=needle_messages(),
                                       extra_body={"rlm": {"max_cost_usd": 0.0001}})
    assert info.value.status_code == 402
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "budget"
    assert info.value.response.json()["rlm"]["stopped_reason"] == "budget"


def test_models_lists_rlm_and_the_root_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["rlm", f"rlm:{ROOT}"]


def test_context_path_under_allow_dir_overrides_the_messages(client: openai.OpenAI, allowed: Path) -> None:
    reply = client.chat.completions.create(
        model=f"rlm:{ROOT}", messages=[{"role": "user", "content": QUERY}],
        extra_body={"rlm": {"context_path": str(allowed / "log.txt")}})
    assert reply.choices[0].message.content == NEEDLE


def test_a_relative_context_path_is_read_under_the_first_allow_dir(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=f"rlm:{ROOT}", messages=[{"role": "user", "content": QUERY}],
        extra_body={"rlm": {"context_path": "log.txt"}})
    assert reply.choices[0].message.content == NEEDLE


def test_a_missing_context_path_is_404_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "q"}],
                                       extra_body={"rlm": {"context_path": "missing.txt"}})
    assert info.value.code == "not_found"
    assert "does not exist" in info.value.message


def test_context_path_outside_allow_dir_is_refused(client: openai.OpenAI, allowed: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret", encoding="utf-8")
    (allowed / "link.txt").symlink_to(outside)
    try:
        for path in (str(outside), str(allowed / ".." / outside.name), str(allowed / "link.txt")):
            with pytest.raises(openai.PermissionDeniedError) as info:
                client.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "q"}],
                                               extra_body={"rlm": {"context_path": path}})
            assert "outside the allowed directories" in info.value.message
    finally:
        (allowed / "link.txt").unlink()


def test_a_missing_or_wrong_key_gets_401_in_the_openai_format(serve_url: str) -> None:
    with openai.OpenAI(base_url=serve_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "q"}])
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    parts = urllib.parse.urlsplit(serve_url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.request("GET", "/v1/models")
        bare = conn.getresponse()
        assert bare.status == 401
        assert json.loads(bare.read())["error"]["type"] == "invalid_request_error"
    finally:
        conn.close()


def test_an_oversized_body_gets_413(client: openai.OpenAI) -> None:
    big = "x" * (600 * 1024)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="rlm", messages=[{"role": "system", "content": big},
                                                              {"role": "user", "content": "q"}])
    assert info.value.status_code == 413
    assert "context_path" in info.value.message


def test_an_unknown_model_gets_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q"}])
    assert info.value.code == "model_not_found"


async def _hold_a_run(serve_url: str, upstream: FakeLLMServer) -> tuple[asyncio.Task[Any], openai.AsyncOpenAI]:
    aclient = openai.AsyncOpenAI(base_url=serve_url, api_key=KEY, max_retries=0, timeout=120)
    deadline = time.monotonic() + 60
    while True:
        held = asyncio.create_task(aclient.chat.completions.create(
            model=f"rlm:{HANG_ROOT}", messages=[{"role": "user", "content": "hold"}]))
        # The run is mid-batch once its three sub-queries hang upstream. The server runs
        # one request at a time: the previous test's cancelled run may still hold the
        # slot for a moment while it winds down (a 429), so ask again until it is free.
        await asyncio.to_thread(wait_until, lambda task=held: upstream.in_flight == 3 or task.done())
        if not held.done():
            return held, aclient
        refused = isinstance(held.exception(), openai.RateLimitError)
        assert refused and time.monotonic() < deadline, held.exception()
        await asyncio.sleep(0.2)


async def test_a_full_queue_gets_429_with_retry_after(serve_url: str, upstream: FakeLLMServer) -> None:
    held, aclient = await _hold_a_run(serve_url, upstream)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            await aclient.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "q"}])
        assert int(info.value.response.headers["Retry-After"]) >= 1
        assert info.value.code == "rate_limit_exceeded"
    finally:
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        await aclient.close()
    assert await asyncio.to_thread(wait_until, lambda: upstream.in_flight == 0)


async def test_a_client_disconnect_cancels_the_run_and_its_requests(serve_url: str, upstream: FakeLLMServer,
                                                                    logs: Path) -> None:
    held, aclient = await _hold_a_run(serve_url, upstream)
    held.cancel()  # closes the HTTP connection mid-request
    await asyncio.gather(held, return_exceptions=True)
    await aclient.close()
    # Only the server cancelling the run can end these: the upstream never answers them.
    assert await asyncio.to_thread(wait_until, lambda: upstream.in_flight == 0)
    # And the slot is free again for the next request.
    with openai.OpenAI(base_url=serve_url, api_key=KEY, max_retries=0) as c:
        assert c.chat.completions.create(model="rlm", messages=needle_messages()).choices[0].message.content == NEEDLE


def test_closing_a_stream_mid_run_cancels_it(client: openai.OpenAI, upstream: FakeLLMServer) -> None:
    stream = client.chat.completions.create(model=f"rlm:{HANG_ROOT}", stream=True,
                                            messages=[{"role": "user", "content": "hold"}])
    events = []
    for chunk in stream:
        events.append((chunk.model_extra or {}).get("rlm", {}).get("event"))
        if "cell" in events:
            break
    assert wait_until(lambda: upstream.in_flight == 3)
    stream.close()
    assert wait_until(lambda: upstream.in_flight == 0)


def test_with_cache_a_repeated_request_sends_no_new_sub_queries(upstream: FakeLLMServer, tmp_path: Path) -> None:
    with rlm_server(["serve", "--port", "0", "--base-url", upstream.url, "--api-key", "k", "--model", ROOT,
                     "--recursive-model", SUB, "--cache", str(tmp_path / "cache")],
                    ready=r"listening on (http://\S+/v1)") as url:
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as c:
            def sub_requests() -> int:
                return sum(1 for r in upstream.requests_log if r["model"] == SUB)

            upstream.reset_counters()
            first = c.chat.completions.create(model="rlm", messages=needle_messages())
            after_first = sub_requests()
            second = c.chat.completions.create(model="rlm", messages=needle_messages())
        assert first.choices[0].message.content == second.choices[0].message.content == NEEDLE
        assert after_first == 6
        assert sub_requests() == 6  # all six came from the cache the second time


def test_binding_beyond_loopback_without_a_key_is_refused(upstream: FakeLLMServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlm.cli", "serve", "--host", "0.0.0.0", "--port", "0", "--base-url", upstream.url,
         "--api-key", "k"], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "RLM_SERVE_AUTH_KEY"})
    assert done.returncode == 2
    assert "--auth-key" in done.stderr


def test_serve_paces_to_the_given_limits(upstream: FakeLLMServer) -> None:
    # A tokens-per-minute limit no root prompt fits: the run fails at once, naming the
    # model and the numbers, and nothing is sent upstream for that model.
    with serve_process(upstream.url, KEY, "--limit", f"{ROOT}=tpm:50") as url, \
            openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60) as c:
        upstream.reset_counters()
        with pytest.raises(openai.APIStatusError) as caught:
            c.chat.completions.create(model="rlm", messages=needle_messages())
    message = str(caught.value)
    assert ROOT in message and "50" in message and "tokens per minute" in message
    assert not [r for r in upstream.requests_log if r["model"] == ROOT]
