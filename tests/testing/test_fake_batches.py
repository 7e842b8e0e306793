"""The Batch APIs of FakeLLMServer, driven by the official SDKs' own calls: OpenAI's
files/batches and Anthropic's messages.batches."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from rlm.testing import BatchOptions, FakeLLMServer
from rlm.testing.model import tokens


def line(custom_id: str, text: str, model: str = "gpt-fake", url: str = "/v1/chat/completions",
         ) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": text}]}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


async def make_server(**options: Any) -> FakeLLMServer:
    return await FakeLLMServer(batches=BatchOptions(**options)).astart()


@pytest.fixture
async def batch_server() -> AsyncIterator[FakeLLMServer]:
    server = await make_server(seed=1)
    yield server
    await server.astop()


@pytest.fixture
async def oai(batch_server: FakeLLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=batch_server.url, api_key="x", max_retries=0) as c:
        yield c


async def submit(oai: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> Any:
    upload = await oai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return await oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


async def output_lines(oai: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await oai.files.content(file_id)
    return [json.loads(x) for x in content.text.splitlines()]


async def test_a_batch_through_the_openai_sdk_answers_every_line_by_custom_id(
    batch_server: FakeLLMServer, oai: openai.AsyncOpenAI
) -> None:
    lines = [line(f"req-{i}", f"ECHO answer {i}") for i in range(20)]
    created = await submit(oai, lines)
    assert created.status == "validating"
    done = await oai.batches.retrieve(created.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (20, 20)
    results = await output_lines(oai, done.output_file_id)
    answers = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
               for r in results}
    assert answers == {f"req-{i}": f"answer {i}" for i in range(20)}
    assert [r["custom_id"] for r in results] != [f"req-{i}" for i in range(20)]  # shuffled
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert done.error_file_id is None
    stats = batch_server.stats()
    assert stats["requests"] == 0
    assert stats["batch_lines"] == 20 and stats["models"]["gpt-fake"]["batch_lines"] == 20
    assert (stats["batches_created"], stats["files_created"]) == (1, 2)


async def test_an_uploaded_file_can_be_retrieved_and_read_back(oai: openai.AsyncOpenAI) -> None:
    data = jsonl([line("a", "x")])
    upload = await oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    card = await oai.files.retrieve(upload.id)
    assert (card.bytes, card.filename, card.purpose) == (len(data), "in.jsonl", "batch")
    assert (await oai.files.content(upload.id)).content == data


async def test_a_batch_is_in_progress_until_its_delay_then_completed() -> None:
    server = await make_server(delay=30)
    try:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x") as oai:
            created = await submit(oai, [line("a", "ECHO 1")])
            again = await oai.batches.retrieve(created.id)
            assert again.status == "in_progress"
            assert again.output_file_id is None
            assert server.stats()["batch_lines"] == 1
    finally:
        await server.astop()


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        ([line("a", "x"), line("a", "y")], "duplicate_custom_id"),
        ([line("a", "x"), line("b", "y", model="other")], "mismatched_model"),
        ([line("a", "x", url="/v1/embeddings")], "mismatched_endpoint"),
    ],
)
async def test_an_invalid_input_file_fails_the_batch_with_the_reason(
    oai: openai.AsyncOpenAI, lines: list[dict[str, Any]], code: str
) -> None:
    created = await submit(oai, lines)
    assert created.status == "failed"
    assert created.errors is not None and created.errors.data
    assert created.errors.data[0].code == code


async def test_only_the_chat_completions_endpoint_and_the_24h_window_are_accepted(
    oai: openai.AsyncOpenAI,
) -> None:
    upload = await oai.files.create(file=("in.jsonl", io.BytesIO(jsonl([line("a", "x")]))),
                                    purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        await oai.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                 completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="input_file_id"):
        await oai.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                 completion_window="24h")


async def test_a_failure_share_puts_lines_in_the_error_file() -> None:
    server = await make_server(failure_rate=0.5, seed=3)
    try:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x") as oai:
            created = await submit(oai, [line(f"r{i}", f"ECHO {i}") for i in range(40)])
            done = await oai.batches.retrieve(created.id)
            good = await output_lines(oai, done.output_file_id)
            bad = await output_lines(oai, done.error_file_id)
    finally:
        await server.astop()
    assert done.request_counts is not None
    assert done.request_counts.failed == len(bad) > 0
    assert len(good) + len(bad) == 40
    assert all(b["response"]["status_code"] == 500 for b in bad)
    assert {b["custom_id"] for b in bad}.isdisjoint({g["custom_id"] for g in good})


async def test_an_expired_batch_keeps_its_done_lines_and_lists_the_rest_as_batch_expired() -> (
    None
):
    server = await make_server(delay=1000, expire_after=0)
    try:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x") as oai:
            created = await submit(oai, [line(f"r{i}", "ECHO x") for i in range(5)])
            done = await oai.batches.retrieve(created.id)
            bad = await output_lines(oai, done.error_file_id)
    finally:
        await server.astop()
    assert done.status == "expired"
    assert done.output_file_id is None
    assert [b["error"]["code"] for b in bad] == ["batch_expired"] * 5


async def test_a_cancelled_batch_is_cancelling_then_cancelled() -> None:
    server = await make_server(delay=1000)
    try:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x") as oai:
            created = await submit(oai, [line("a", "ECHO x")])
            cancelling = await oai.batches.cancel(created.id)
            cancelled = await oai.batches.retrieve(created.id)
    finally:
        await server.astop()
    assert cancelling.status == "cancelling"
    assert cancelled.status == "cancelled"


async def test_batches_are_listed_newest_first_with_cursor_pages(oai: openai.AsyncOpenAI) -> None:
    ids = [(await submit(oai, [line("a", "x")])).id for _ in range(3)]
    first = await oai.batches.list(limit=2)
    assert [b.id for b in first.data] == [ids[2], ids[1]]
    assert first.has_more
    listed = [b.id async for b in oai.batches.list(limit=2)]
    assert listed == ids[::-1]


async def test_batch_lines_report_usage_and_cached_tokens_like_live_replies(
    oai: openai.AsyncOpenAI,
) -> None:
    long = "z" * 4096 * 2
    warm = await submit(oai, [line("warm", long)])
    await oai.batches.retrieve(warm.id)  # the first look settles it
    created = await submit(oai, [line("hit", long)])
    done = await oai.batches.retrieve(created.id)
    (result,) = await output_lines(oai, done.output_file_id)
    usage = result["response"]["body"]["usage"]
    assert usage["prompt_tokens"] == tokens(len(long))
    assert usage["prompt_tokens_details"]["cached_tokens"] == 2048
    assert done.usage is not None and done.usage.input_tokens == tokens(len(long))


# -- Anthropic Message Batches ----------------------------------------------------------


def params(text: str, model: str = "claude-fake") -> dict[str, Any]:
    return {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": text}]}


async def test_message_batches_through_the_anthropic_sdk_answer_every_request(
    batch_server: FakeLLMServer,
) -> None:
    async with anthropic.AsyncAnthropic(api_key="k", base_url=batch_server.root_url) as claude:
        requests: list[Any] = [{"custom_id": f"q{i}", "params": params(f"ECHO a{i}")}
                               for i in range(6)]
        requests.append({"custom_id": "broken", "params": {"model": "claude-fake",
                                                             "messages": []}})
        created = await claude.messages.batches.create(requests=requests)
        assert created.processing_status == "in_progress"
        done = await claude.messages.batches.retrieve(created.id)
        assert done.processing_status == "ended"
        assert (done.request_counts.succeeded, done.request_counts.errored) == (6, 1)
        results = {r.custom_id: r.result async for r in await claude.messages.batches.results(
            created.id)}
        listed = [b.id async for b in claude.messages.batches.list()]
    texts = {k: v.message.content[0].text for k, v in results.items() if v.type == "succeeded"}
    assert texts == {f"q{i}": f"a{i}" for i in range(6)}
    assert results["broken"].type == "errored"
    assert listed == [created.id]
    stats = batch_server.stats()
    assert (stats["requests"], stats["models"]["claude-fake"]["batch_lines"]) == (0, 7)


async def test_a_cancelled_message_batch_ends_with_canceled_results() -> None:
    server = await make_server(delay=1000)
    try:
        async with anthropic.AsyncAnthropic(api_key="k", base_url=server.root_url) as claude:
            created = await claude.messages.batches.create(
                requests=[{"custom_id": "a", "params": params("x")}]  # type: ignore[list-item]
            )
            canceling = await claude.messages.batches.cancel(created.id)
            ended = await claude.messages.batches.retrieve(created.id)
            results = [r async for r in await claude.messages.batches.results(created.id)]
    finally:
        await server.astop()
    assert canceling.processing_status == "canceling"
    assert ended.processing_status == "ended"
    assert ended.request_counts.canceled == 1
    assert results[0].result.type == "canceled"


async def test_message_batches_refuse_duplicate_custom_ids_and_need_the_anthropic_headers(
    batch_server: FakeLLMServer,
) -> None:
    async with anthropic.AsyncAnthropic(api_key="k", base_url=batch_server.root_url) as claude:
        with pytest.raises(anthropic.BadRequestError, match="not unique"):
            await claude.messages.batches.create(requests=[  # type: ignore[list-item]
                {"custom_id": "a", "params": params("x")},
                {"custom_id": "a", "params": params("y")},
            ])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{batch_server.root_url}/v1/messages/batches") as response:
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "authentication_error"
