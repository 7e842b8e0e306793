"""``rlm mcp`` REPL sessions belong to the MCP client session that opened them: another
client that learns a REPL session id gets "no open REPL session" for it. Client sessions
exist in the handshake protocol (``mode="legacy"``): the stateless 2026-07-28 protocol
has none to bind to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from serve_support import ROOT, SUB, rlm_server

from rlm.testing import FakeLLMServer

KEY = "test-mcp-guard-key"


@pytest.fixture(scope="module")
def mcp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with FakeLLMServer() as upstream:
        args = ["mcp", "--base-url", upstream.url, "--api-key", "k", "--model", ROOT, "--recursive-model", SUB,
                "--sandbox", "local", "--http", "127.0.0.1:0", "--auth-key", KEY]
        with rlm_server(args, ready=r"streamable HTTP on (http://\S+/mcp)") as url:
            yield url


def http_client(url: str, http: httpx2.AsyncClient) -> Client:
    return Client(streamable_http_client(url, http_client=http), mode="legacy")


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def test_another_client_session_cannot_use_a_repl_session_id(mcp_url: str) -> None:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        async with http_client(mcp_url, http) as owner, http_client(mcp_url, http) as other:
            opened = await owner.call_tool("repl_open", {"context": "OWNER-SECRET"})
            sid = opened.structured_content["session_id"]
            stolen = await other.call_tool("repl_exec", {"session_id": sid, "code": "print(context)"})
            closed = await other.call_tool("repl_close", {"session_id": sid})
            mine = await owner.call_tool("repl_exec", {"session_id": sid, "code": "print(context)"})
    assert stolen.is_error and "no open REPL session" in text_of(stolen)
    assert "OWNER-SECRET" not in text_of(stolen)
    assert closed.is_error and "no open REPL session" in text_of(closed)
    assert mine.structured_content["stdout"] == "OWNER-SECRET\n"


async def test_the_owning_client_session_keeps_its_repl_session_across_calls(mcp_url: str) -> None:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        async with http_client(mcp_url, http) as owner:
            sid = (await owner.call_tool("repl_open", {"context": "z"})).structured_content["session_id"]
            await owner.call_tool("repl_exec", {"session_id": sid, "code": "x = 41"})
            ran = await owner.call_tool("repl_exec", {"session_id": sid, "code": "print(x + 1)"})
            closed = await owner.call_tool("repl_close", {"session_id": sid})
    assert ran.structured_content["stdout"] == "42\n"
    assert closed.structured_content["closed"] is True


