"""FakeLLMServer's per-model rate limits, prompt caching and reasoning tokens, as the
official openai SDK sees them over real sockets."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from rlm.testing import FakeLLMServer, Limit, fetch_stats, spawn_fake_server
from rlm.testing.limits import format_duration


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    """The echo server with limits on two models: "small" (2 requests/s, a bucket of 2)
    and "tokens" (1,000 tokens/min); every other model is unlimited."""
    limits = {"small": {"rps": 2, "burst": 2}, "tokens": {"tpm": 1000}}
    async with FakeLLMServer(limits=limits) as srv:
        yield srv


async def test_every_reply_of_a_limited_model_carries_openai_ratelimit_headers(
    sdk: openai.AsyncOpenAI,
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(model="small", messages=user("hi"))
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "120"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(r"\d+ms|\d+(\.\d+)?s", headers["x-ratelimit-reset-requests"])


async def test_a_request_past_the_bucket_gets_a_429_with_retry_after_and_rate_limit_exceeded(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    for _ in range(2):
        await sdk.chat.completions.create(model="small", messages=user("ECHO ok"))
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="small", messages=user("ECHO ok"))
    headers = caught.value.response.headers
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after-ms"]) <= 500
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert server.stats()["models"]["small"]["rate_limited"] == 1
    assert server.stats()["rate_limited"] == 1


async def test_each_model_has_its_own_buckets_and_unlimited_models_send_no_headers(
    sdk: openai.AsyncOpenAI,
) -> None:
    for _ in range(2):
        await sdk.chat.completions.create(model="small", messages=user("a"))
    raw = await sdk.chat.completions.with_raw_response.create(model="free", messages=user("a"))
    assert "x-ratelimit-limit-requests" not in raw.headers
    raw = await sdk.chat.completions.with_raw_response.create(
        model="tokens", messages=user("a")
    )
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"


async def test_a_request_costs_its_prompt_chars_over_4_plus_max_tokens_in_the_token_bucket(
    server: FakeLLMServer, sdk: openai.AsyncOpenAI
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="tokens", messages=user("x" * 2000), max_tokens=400
    )
    assert raw.headers["x-ratelimit-remaining-tokens"] == "100"
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="tokens", messages=user("x" * 400))
    assert caught.value.type == "tokens"
    # Without max_tokens the estimate adds the default 256 completion tokens.
    assert "Requested 356" in caught.value.message


async def test_a_request_larger_than_the_token_limit_is_refused_as_too_large_without_a_wait(
    sdk: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(
            model="tokens", messages=user("x" * 8000), max_tokens=10
        )
    assert "Request too large" in caught.value.message
    assert "retry-after" not in caught.value.response.headers


async def test_the_star_limit_gives_every_other_model_a_bucket_of_its_own() -> None:
    async with FakeLLMServer(limits={"*": Limit(rps=1, burst=1)}) as server:
        async with openai.AsyncOpenAI(
            base_url=server.url, api_key="x", max_retries=0,
            http_client=openai.DefaultAioHttpClient(),
        ) as sdk:
            await sdk.chat.completions.create(model="a", messages=user("x"))
            await sdk.chat.completions.create(model="b", messages=user("x"))
            with pytest.raises(openai.RateLimitError):
                await sdk.chat.completions.create(model="a", messages=user("x"))


def test_durations_are_written_the_way_openai_headers_write_them() -> None:
    assert [format_duration(s) for s in (0, 0.25, 1.5, 17.28, 360, 3723)] == [
        "0s", "250ms", "1.5s", "17.28s", "6m0s", "1h2m3s",
    ]


def test_unknown_or_conflicting_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rpm"):
        FakeLLMServer(limits={"m": {"rmp": 5}})
    with pytest.raises(ValueError, match="not both"):
        Limit(rps=1, rpm=60)


@pytest.mark.parametrize("spec", ["*:rps=1,burst=1", "*=rps:1,burst:1"])
def test_the_command_line_limit_applies_per_model_and_counts_429s(spec: str) -> None:
    # Both forms: this server's MODEL:KEY=N and `rlm --limit`'s MODEL=KEY:N.
    with spawn_fake_server(extra_args=["--limit", spec]) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        with client:
            client.chat.completions.create(model="m", messages=user("x"))
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="m", messages=user("x"))
        stats = fetch_stats(url)
    assert stats["models"]["m"] == {"requests": 2, "rate_limited": 1, "batch_lines": 0}


# -- prompt caching and reasoning -----------------------------------------------------


async def test_a_repeated_long_prompt_reports_its_cached_prefix_in_128_token_steps(
    server: FakeLLMServer,
) -> None:
    base = "y" * 4096 * 2  # 2,048 tokens
    async with openai.AsyncOpenAI(
        base_url=server.url, api_key="x", http_client=openai.DefaultAioHttpClient()
    ) as sdk:
        first = await sdk.chat.completions.create(model="m", messages=user(base))
        longer = await sdk.chat.completions.create(model="m", messages=user(base + "z" * 600))
        other_model = await sdk.chat.completions.create(model="n", messages=user(base))
    assert first.usage is not None and longer.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert longer.usage.prompt_tokens_details is not None
    assert longer.usage.prompt_tokens_details.cached_tokens == 2048
    assert other_model.usage is not None and other_model.usage.prompt_tokens_details is not None
    assert other_model.usage.prompt_tokens_details.cached_tokens == 0


async def test_prompts_under_1024_tokens_are_never_reported_cached(server: FakeLLMServer) -> None:
    async with openai.AsyncOpenAI(
        base_url=server.url, api_key="x", http_client=openai.DefaultAioHttpClient()
    ) as sdk:
        for _ in range(2):
            reply = await sdk.chat.completions.create(model="m", messages=user("q" * 4000))
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


async def test_a_reasoning_model_reports_reasoning_tokens_inside_its_completion_tokens() -> None:
    async with FakeLLMServer(reasoning={"o-fake": 64}) as server:
        async with openai.AsyncOpenAI(
            base_url=server.url, api_key="x", http_client=openai.DefaultAioHttpClient()
        ) as sdk:
            reply = await sdk.chat.completions.create(model="o-fake", messages=user("ECHO abcd"))
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 64
    assert reply.usage.completion_tokens == 1 + 64
