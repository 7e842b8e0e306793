"""``rlm serve`` driven by client software nobody on this project wrote, over real HTTP.

The openai SDK (the plain streaming loop, a whole reply, ``include_usage``), LangChain's
``ChatOpenAI.with_structured_output`` with each of its methods, and the LiteLLM SDK each
talk to a real ``rlm serve`` subprocess whose upstream is FakeLLMServer: a scripted
root model that chunks the context and fans out with ``llm_query_batch``, and a
sub-model that reads each chunk (see serve_support).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel
from serve_support import (
    NEEDLE,
    QUERY,
    TYPED_ROOT,
    haystack,
    needle_messages,
    serve_process,
)

from rlm.testing import FakeLLMServer

KEY = "test-interop-key"


@pytest.fixture(scope="module")
def serve_url(upstream: FakeLLMServer) -> Iterator[str]:
    with serve_process(upstream.url, KEY, "--sandbox", "local") as url:
        yield url


@pytest.fixture
def client(serve_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=serve_url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


# -- the openai SDK ----------------------------------------------------------------------


def test_openai_sdk_plain_streaming_loop(client: openai.OpenAI) -> None:
    printed = []
    for ch in client.chat.completions.create(model="rlm", messages=needle_messages(), stream=True):
        printed.append(ch.choices[0].delta.content)
    assert "".join(p for p in printed if p) == NEEDLE


def test_openai_sdk_whole_reply(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="rlm", messages=needle_messages())
    assert reply.choices[0].message.content == NEEDLE
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens > 0


def test_openai_sdk_stream_with_include_usage(client: openai.OpenAI) -> None:
    content, usage = [], None
    for ch in client.chat.completions.create(model="rlm", messages=needle_messages(), stream=True,
                                             stream_options={"include_usage": True}):
        if ch.choices:
            content.append(ch.choices[0].delta.content or "")
        if ch.usage is not None:
            usage = ch.usage
    assert "".join(content) == NEEDLE
    assert usage is not None and usage.total_tokens > 0


# -- LangChain ---------------------------------------------------------------------------


class Found(BaseModel):
    """What the search found."""

    passphrase: str
    chunks: int


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(serve_url: str, method: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=f"rlm:{TYPED_ROOT}", base_url=serve_url, api_key=KEY, max_retries=0,
                     timeout=60)
    structured = llm.with_structured_output(Found, method=method)
    found = structured.invoke([("system", haystack()), ("human", QUERY)])
    assert found == Found(passphrase=NEEDLE, chunks=6)


# -- LiteLLM -----------------------------------------------------------------------------


@pytest.fixture
def litellm(monkeypatch: pytest.MonkeyPatch) -> Any:
    # Its price map is read from the package, not fetched: these tests reach loopback only.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("LITELLM_TELEMETRY", "False")
    return pytest.importorskip(
        "litellm", reason="the LiteLLM SDK is not installed: pip install litellm (it is in [dev])")


@pytest.mark.filterwarnings("ignore::UserWarning")  # its own types, as pydantic builds them
def test_litellm_sdk_completion_and_stream(serve_url: str, litellm: Any) -> None:
    common: dict[str, Any] = {"model": "openai/rlm", "api_base": serve_url, "api_key": KEY,
                              "messages": needle_messages(), "timeout": 60, "num_retries": 0}
    reply = litellm.completion(**common)
    assert reply.choices[0].message.content == NEEDLE
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in litellm.completion(**common, stream=True) if chunk.choices)
    assert streamed == NEEDLE
