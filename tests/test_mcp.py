"""``rlm mcp`` driven by the official MCP SDK client: over stdio (the SDK launches the
server as a subprocess) and over streamable HTTP (a real ``rlm mcp --http`` process).

FakeLLMServer plays the upstream models, as in test_serve.py: a scripted root model that
fans out over the context, a sub-model that reads chunks (and echoes ``ECHO x``), and a
root script whose sub-queries never come back, to prove that a cancelled call cancels.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from jsonschema import Draft202012Validator
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from rlm_support import wait_until
from serve_support import (
    FOUND_SCHEMA,
    HANG_ROOT,
    LOOP_ROOT,
    NEEDLE,
    QUERY,
    ROOT,
    SUB,
    TYPED_ROOT,
    haystack,
    rlm_server,
)

from rlm.cli import package_version
from rlm.testing import FakeLLMServer

KEY = "test-mcp-key"


def mcp_args(upstream: FakeLLMServer, allowed: Path, *extra: str, model: str = ROOT) -> list[str]:
    return ["-m", "rlm.cli", "mcp", "--base-url", upstream.url, "--api-key", "upstream-key",
            "--model", model, "--recursive-model", SUB, "--allow-dir", str(allowed), *extra]


def stdio(upstream: FakeLLMServer, allowed: Path, *extra: str, model: str = ROOT) -> Client:
    return Client(StdioServerParameters(command=sys.executable, args=mcp_args(upstream, allowed, *extra,
                                                                              model=model)))


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def test_tools_are_listed_with_their_arguments(upstream: FakeLLMServer, allowed: Path) -> None:
    async with stdio(upstream, allowed) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"rlm_query", "repl_open", "repl_exec", "repl_close"}
    params = tools["rlm_query"].input_schema["properties"]
    assert set(params) == {"query", "context", "context_path", "schema", "max_cost_usd"}
    assert tools["rlm_query"].input_schema["required"] == ["query"]
    assert "answer" in tools["rlm_query"].output_schema["properties"]
    assert set(tools["repl_exec"].input_schema["required"]) == {"session_id", "code"}


# What makes a schema say something: an empty one ({}, or only title, description and
# default) draws warnings from strict checkers such as the MCP Inspector's --strict mode.
_KEYWORDS = {"type", "anyOf", "oneOf", "allOf", "$ref", "enum", "const", "not"}


def _subschemas(schema: Any, where: str) -> Iterator[tuple[str, Any]]:
    yield where, schema
    if not isinstance(schema, dict):
        return
    for key in ("properties", "$defs", "patternProperties"):
        for name, sub in (schema.get(key) or {}).items():
            yield from _subschemas(sub, f"{where}.{key}.{name}")
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            yield from _subschemas(schema[key], f"{where}.{key}")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            yield from _subschemas(sub, f"{where}.{key}[{i}]")


async def test_tool_schemas_are_valid_json_schemas_with_a_keyword_in_every_part(
    upstream: FakeLLMServer, allowed: Path
) -> None:
    async with stdio(upstream, allowed) as client:
        tools = (await client.list_tools()).tools
    for tool in tools:
        for kind, schema in (("input", tool.input_schema), ("output", tool.output_schema)):
            Draft202012Validator.check_schema(schema)
            for where, sub in _subschemas(schema, f"{tool.name} {kind}"):
                assert isinstance(sub, bool) or _KEYWORDS & set(sub), where


async def test_the_server_reports_the_package_version_and_dedented_descriptions(
    upstream: FakeLLMServer, allowed: Path
) -> None:
    async with stdio(upstream, allowed) as client:
        info = client.server_info
        tools = (await client.list_tools()).tools
    assert info.name == "rlm" and info.version == package_version()
    for tool in tools:
        assert tool.description and tool.description == tool.description.strip()
        assert "\n " not in tool.description, tool.name


async def test_rlm_query_at_the_iteration_limit_returns_no_answer(upstream: FakeLLMServer,
                                                                  allowed: Path) -> None:
    async with stdio(upstream, allowed, "--max-iterations", "2", model=LOOP_ROOT) as client:
        result = await client.call_tool("rlm_query", {"query": QUERY, "context": "x"})
    assert result.is_error
    assert "iteration limit" in text_of(result) and "print(" not in text_of(result)
    assert result.structured_content["answer"] is None
    assert result.structured_content["stopped_reason"] == "max_iterations"


async def test_rlm_query_answers_with_structured_content_and_progress(upstream: FakeLLMServer,
                                                                      allowed: Path, tmp_path: Path) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with stdio(upstream, allowed, "--log-dir", str(tmp_path)) as client:
        result = await client.call_tool("rlm_query", {"query": QUERY, "context": haystack()},
                                        progress_callback=on_progress)
    assert not result.is_error
    assert text_of(result) == NEEDLE
    data = result.structured_content
    assert data["answer"] == NEEDLE
    assert data["stopped_reason"] == "final"
    assert data["iterations"] == 2 and data["sub_calls"] == 6
    assert data["usage"]["sub"]["calls"] == 6 and data["usage"]["total"]["total_tokens"] > 0
    assert Path(data["log_path"]).parent == tmp_path
    messages = [m for _, m in progress]
    assert "sub-queries 6/6" in messages
    assert any(m and m.startswith("iteration 2") for m in messages)
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)  # progress only grows


async def test_rlm_query_with_a_schema_returns_the_validated_output(upstream: FakeLLMServer,
                                                                     allowed: Path) -> None:
    async with stdio(upstream, allowed, model=TYPED_ROOT) as client:
        result = await client.call_tool("rlm_query", {"query": QUERY, "context_path": "log.txt",
                                                      "schema": FOUND_SCHEMA})
        broken = await client.call_tool("rlm_query", {"query": QUERY, "context": "x", "schema": {"type": 12}})
    assert result.structured_content["output"] == {"passphrase": NEEDLE, "chunks": 6}
    assert json.loads(text_of(result)) == {"passphrase": NEEDLE, "chunks": 6}
    assert broken.is_error and "not a valid JSON Schema" in text_of(broken)


async def test_repl_session_fans_out_through_llm_query_batch(upstream: FakeLLMServer, allowed: Path) -> None:
    async with stdio(upstream, allowed) as client:
        opened = await client.call_tool("repl_open", {"context_path": "log.txt"})
        assert not opened.is_error, text_of(opened)
        sid = opened.structured_content["session_id"]
        assert "3,000 lines" in opened.structured_content["context"]
        ran = await client.call_tool("repl_exec", {
            "session_id": sid,
            "code": "n = len(context.splitlines())\n"
                    "echoes = llm_query_batch([f'ECHO {i}' for i in range(5)])\nprint(n, echoes)"})
        assert not ran.is_error, text_of(ran)
        assert ran.structured_content["stdout"] == "3000 ['0', '1', '2', '3', '4']\n"
        assert ran.structured_content["sub_calls"] == 5
        again = await client.call_tool("repl_exec", {"session_id": sid, "code": "print(echoes[-1], n)"})
        assert again.structured_content["stdout"] == "4 3000\n"  # state persists across calls
        failed = await client.call_tool("repl_exec", {"session_id": sid, "code": "1 / 0"})
        assert failed.is_error and "ZeroDivisionError" in failed.structured_content["error"]
        closed = await client.call_tool("repl_close", {"session_id": sid})
        assert closed.structured_content == {"session_id": sid, "closed": True}
        gone = await client.call_tool("repl_exec", {"session_id": sid, "code": "print(1)"})
        assert gone.is_error and "repl_open" in text_of(gone)


async def test_repl_output_is_cut_to_the_budget(upstream: FakeLLMServer, allowed: Path) -> None:
    async with stdio(upstream, allowed, "--max-output-chars", "1000") as client:
        sid = (await client.call_tool("repl_open", {"context": "x"})).structured_content["session_id"]
        ran = await client.call_tool("repl_exec", {"session_id": sid, "code": "print('y' * 50_000)"})
    out = ran.structured_content
    assert out["truncated"] is True
    assert len(out["stdout"]) + len(out["stderr"]) <= 1000
    assert out["stdout"].startswith("yyy") and "chars cut" in out["stdout"]


async def test_sessions_are_capped(upstream: FakeLLMServer, allowed: Path) -> None:
    async with stdio(upstream, allowed, "--max-sessions", "1", "--sandbox", "local") as client:
        first = await client.call_tool("repl_open", {"context": "a"})
        second = await client.call_tool("repl_open", {"context": "b"})
        assert second.is_error and "too many open REPL sessions" in text_of(second)
        await client.call_tool("repl_close", {"session_id": first.structured_content["session_id"]})
        third = await client.call_tool("repl_open", {"context": "c"})
        assert not third.is_error


async def test_context_path_outside_allow_dir_is_refused(upstream: FakeLLMServer, allowed: Path,
                                                         tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret", encoding="utf-8")
    link = allowed / "sneaky.txt"
    link.symlink_to(outside)
    try:
        async with stdio(upstream, allowed) as client:
            for path in (str(outside), "../" + outside.parent.name + "/secret.txt", "sneaky.txt"):
                for tool, args in (("rlm_query", {"query": "q", "context_path": path}),
                                   ("repl_open", {"context_path": path})):
                    result = await client.call_tool(tool, args)
                    assert result.is_error, (tool, path)
                    assert "outside the allowed directories" in text_of(result)
    finally:
        link.unlink()


async def test_cancelling_rlm_query_cancels_the_run(upstream: FakeLLMServer, allowed: Path) -> None:
    async with stdio(upstream, allowed, model=HANG_ROOT) as client:
        with anyio.move_on_after(60) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "rlm_query", {"query": "hold", "context": "x"})
                # The run is mid-batch once its three sub-queries hang upstream.
                assert await anyio.to_thread.run_sync(lambda: wait_until(lambda: upstream.in_flight == 3))
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        # Only the server cancelling the run can end these: the upstream never answers them.
        assert await anyio.to_thread.run_sync(lambda: wait_until(lambda: upstream.in_flight == 0))
        # The server is still fine afterwards.
        sid = (await client.call_tool("repl_open", {"context": "z"})).structured_content["session_id"]
        ran = await client.call_tool("repl_exec", {"session_id": sid, "code": "print(llm_query('ECHO ok'))"})
        assert ran.structured_content["stdout"] == "ok\n"


@pytest.fixture(scope="module")
def mcp_http(upstream: FakeLLMServer, allowed: Path) -> Iterator[str]:
    with rlm_server([*mcp_args(upstream, allowed, "--http", "127.0.0.1:0", "--auth-key", KEY)[2:]],
                    ready=r"streamable HTTP on (http://\S+/mcp)") as url:
        yield url


async def test_streamable_http_round_trip_with_the_bearer_key(mcp_http: str) -> None:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        async with Client(streamable_http_client(mcp_http, http_client=http)) as client:
            result = await client.call_tool("rlm_query", {"query": QUERY, "context": haystack()})
    assert text_of(result) == NEEDLE
    assert result.structured_content["sub_calls"] == 6


async def test_streamable_http_without_the_key_gets_401_with_a_plain_bearer_challenge(mcp_http: str) -> None:
    async with httpx2.AsyncClient(timeout=30) as http:
        response = await http.post(mcp_http, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        wrong = await http.post(mcp_http, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    # No resource_metadata: nothing points a client at an OAuth server that is not there.
    assert response.headers["www-authenticate"] == 'Bearer realm="rlm mcp"'
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer realm="rlm mcp", error="invalid_token"'


@pytest.mark.parametrize("path", [
    "/.well-known/oauth-protected-resource",
    "/.well-known/oauth-protected-resource/mcp",
    "/.well-known/oauth-authorization-server",
    "/register",
])
async def test_oauth_discovery_finds_nothing_over_http(mcp_http: str, path: str) -> None:
    base = mcp_http.removesuffix("/mcp")
    async with httpx2.AsyncClient(timeout=30) as http:
        response = await (http.post if path == "/register" else http.get)(base + path)
    assert response.status_code == 404
    assert "Authorization: Bearer" in response.json()["error"]["message"]
