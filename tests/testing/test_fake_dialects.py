"""Azure OpenAI's and Gemini's addresses for chat completions on FakeLLMServer: URL and auth
shapes as the openai SDK sends them, and Gemini's cumulative streaming usage."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from rlm.testing import FakeLLMServer


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_the_azure_sdk_client_reaches_its_deployment_with_api_version_and_api_key(
    server: FakeLLMServer,
) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=server.root_url, api_key="azure-key", api_version="2024-10-21"
    ) as azure:
        reply = await azure.chat.completions.create(model="my-deploy", messages=user("ECHO a"))
    assert reply.choices[0].message.content == "a"
    assert reply.model == "my-deploy"
    entry = server.requests_log[-1]
    assert entry["path"] == "/openai/deployments/my-deploy/chat/completions"
    assert entry["query"] == {"api-version": "2024-10-21"}
    assert entry["auth_headers"] == ["api-key"]
    assert (entry["protocol"], entry["model"], entry["has_authorization"]) == (
        "azure", "my-deploy", False,
    )
    assert "azure-key" not in repr(entry)


async def test_an_azure_deployment_url_without_api_version_is_resource_not_found(
    server: FakeLLMServer,
) -> None:
    async with aiohttp.ClientSession(headers={"api-key": "k"}) as session:
        async with session.post(
            f"{server.root_url}/openai/deployments/d/chat/completions",
            json={"messages": user("hi")},
        ) as response:
            assert response.status == 404
            assert (await response.json())["error"] == {"code": "404",
                                                        "message": "Resource not found"}
    assert server.requests == 0


async def test_azure_without_a_key_is_a_401(server: FakeLLMServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.root_url}/openai/deployments/d/chat/completions?api-version=x",
            json={"messages": user("hi")},
        ) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "401"


async def test_the_azure_v1_path_takes_the_model_from_the_body_and_a_bearer_key(
    server: FakeLLMServer,
) -> None:
    async with openai.AsyncOpenAI(base_url=f"{server.root_url}/openai/v1", api_key="k") as sdk:
        reply = await sdk.chat.completions.create(model="gpt-4o-deploy", messages=user("ECHO v1"))
    assert reply.choices[0].message.content == "v1"
    entry = server.requests_log[-1]
    assert (entry["path"], entry["model"], entry["auth_headers"]) == (
        "/openai/v1/chat/completions", "gpt-4o-deploy", ["authorization"],
    )


async def test_gemini_needs_a_bearer_key(server: FakeLLMServer) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{server.root_url}/v1beta/openai/", api_key="g", max_retries=0,
        default_headers={"Authorization": ""},
    ) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(model="gemini-fake", messages=user("hi"))


async def test_gemini_streams_carry_the_running_usage_on_every_chunk(
    server: FakeLLMServer,
) -> None:
    text = "a reply long enough to be streamed in several pieces"
    async with openai.AsyncOpenAI(base_url=f"{server.root_url}/v1beta/openai/", api_key="g") as sdk:
        stream = await sdk.chat.completions.create(
            model="gemini-fake", messages=user(f"ECHO {text}"), stream=True
        )
        chunks = [chunk async for chunk in stream]
    usages = [chunk.usage for chunk in chunks]
    assert all(u is not None for u in usages)
    completion = [u.completion_tokens for u in usages if u is not None]
    assert completion == sorted(completion)
    assert completion[-1] == len(text) // 4
    assert sum(completion) > len(text) // 4  # summing the chunks would count it twice
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert server.requests_log[-1]["protocol"] == "gemini"
