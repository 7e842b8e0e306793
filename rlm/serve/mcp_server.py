"""``rlm mcp``: an MCP server (official ``mcp`` SDK) giving agents RLM runs and a sandboxed REPL.

Tools:

- ``rlm_query(query, context, context_path, schema, max_cost_usd)`` runs a whole RLM and
  returns the answer as text plus structured content (answer, stopped_reason,
  iterations, sub_calls, usage, log_path). Progress goes out as MCP progress
  notifications while it runs; a client's cancellation cancels the run.
- ``repl_open(context | context_path)``, ``repl_exec(session_id, code)`` and
  ``repl_close(session_id)`` let the agent itself be the root model, with
  ``llm_query_batch`` fanning out through the server's client. A session spends within
  the server's ``--max-tokens``/``--max-cost-usd`` and belongs to the MCP client session
  that opened it.

A run stopped at its iteration limit without a ``FINAL`` in its last turn has no
answer (``answer`` null, ``stopped_reason`` "max_iterations", an error result): the
root model's raw last reply is often REPL code and is never presented as the answer.

stdio by default; ``--http HOST:PORT`` serves streamable HTTP at ``/mcp`` (with a bearer
key, required beyond loopback as for ``rlm serve``). The key is a plain bearer token,
not OAuth: a request without it gets a 401 whose challenge names no authorization
server, and every other path (the OAuth discovery documents included) is a 404, so an
MCP client reports the missing header instead of starting an OAuth flow. Nothing but
the protocol may be written to stdout in stdio mode: notices go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, WithJsonSchema

from rlm.errors import AccessDeniedError, ConfigError, SessionError
from rlm.serve.auth import bearer_matches, check_bind
from rlm.serve.paths import AllowedDirs
from rlm.serve.runs import (
    QueryRunner,
    RunProgress,
    UpstreamSettings,
    progress_message,
    result_metadata,
    served_answer,
)
from rlm.serve.sessions import SessionManager
from rlm.version import package_version

__all__ = ["McpOptions", "build_server", "run_mcp"]

# Any JSON value, spelled out: an empty schema ({}) has no keyword, which strict schema
# checkers (the MCP Inspector's --strict mode) warn about; one type per branch, because
# they refuse a list of types as well.
JSONValue = Annotated[Any, WithJsonSchema(
    {"anyOf": [{"type": kind} for kind in ("string", "number", "boolean", "object", "array", "null")]})]
JSONContext = str | list[JSONValue] | dict[str, Any] | None
MCP_PATH = "/mcp"
# Inline contexts travel in the request over HTTP: allow big ones (as rlm serve does).
MAX_HTTP_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class McpOptions:
    """How ``rlm mcp`` serves: transport, auth, readable dirs and REPL session limits."""

    http_host: str | None = None
    http_port: int | None = None
    auth_key: str | None = None
    allow_dirs: AllowedDirs = field(default_factory=lambda: AllowedDirs(()))
    max_sessions: int = 8
    session_idle_s: float = 900.0
    max_output_chars: int = 20_000
    cell_timeout_s: float = 120.0


class QueryOutput(BaseModel):
    """Structured content of ``rlm_query``."""

    answer: str | None = Field(description="the answer (JSON text with a schema), or null when the run ended without one")
    output: JSONValue = Field(default=None, description="with a schema: the validated answer as JSON data")
    stopped_reason: str = Field(description="final | max_iterations | budget | invalid_answer | error")
    error: str | None = None
    iterations: int
    sub_calls: int
    elapsed_s: float
    usage: dict[str, Any] = Field(description="root, sub and total: calls, tokens, cost_usd")
    log_path: str | None = Field(default=None, description="the run's JSONL trajectory, with --log-dir")
    raw_output: JSONValue = Field(default=None, description="after invalid_answer: the last value given to FINAL")
    validation_errors: list[dict[str, str]] | None = Field(
        default=None, description="after invalid_answer: what did not match the schema")


class OpenOutput(BaseModel):
    """Structured content of ``repl_open``."""

    session_id: str
    context: str = Field(description="what the REPL holds as `context`: type, size, a preview")
    sandbox: str
    idle_timeout_s: float


class ExecOutput(BaseModel):
    """Structured content of ``repl_exec``."""

    stdout: str
    stderr: str
    error: str | None = Field(description="the traceback or policy message, if the cell failed")
    final: str | None = Field(description="the value given to FINAL/FINAL_VAR in this cell, if any")
    sub_calls: int
    duration_s: float
    truncated: bool = Field(description="true when output was cut to the server's budget")


class CloseOutput(BaseModel):
    """Structured content of ``repl_close``."""

    session_id: str
    closed: bool


def _context_from(context: JSONContext, context_path: str | None, allow_dirs: AllowedDirs,
                  *, required: bool) -> Any:
    if context is not None and context_path is not None:
        raise ToolError("give context or context_path, not both")
    if context_path is not None:
        try:
            return allow_dirs.read_text(context_path)
        except (AccessDeniedError, FileNotFoundError) as exc:
            raise ToolError(str(exc)) from None
    if context is None and required:
        raise ToolError("give the context (text or JSON) or a context_path")
    return context


@contextlib.asynccontextmanager
async def _progress_to(ctx: Context) -> AsyncIterator[RunProgress]:
    """Forward a run's events as MCP progress notifications while the block runs."""
    progress = RunProgress()

    async def pump() -> None:
        sent = 0
        while (event := await progress.next()) is not None:
            message = progress_message(event)
            if message is None:
                continue
            sent += 1
            # A client that stopped listening must not fail the run.
            with contextlib.suppress(Exception):
                await ctx.report_progress(sent, None, message)

    task = asyncio.create_task(pump())
    try:
        yield progress
    except BaseException:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    # Events sent from other threads were queued before the result reached us.
    progress.finish()
    await task


def _client_session(ctx: Context) -> str:
    """The MCP client session a request belongs to, which owns the REPL sessions it opens:
    over HTTP its transport session id (the SDK routes each request to its session by
    that id), on stdio the one client there is. The stateless protocol (2026-07-28 over
    HTTP) has no client sessions: its requests share one owner, and a REPL session id
    (128 random bits) is then the only key to its session."""
    headers = ctx.headers
    if headers is None:
        return "stdio"
    return "http:" + (headers.get(MCP_SESSION_ID_HEADER) or "")


def _exec_text(out: dict[str, Any]) -> str:
    parts = []
    if out["stdout"]:
        parts.append(out["stdout"].rstrip("\n"))
    if out["stderr"]:
        parts.append("[stderr]\n" + out["stderr"].rstrip("\n"))
    if out["error"]:
        parts.append("[error]\n" + out["error"].rstrip("\n"))
    if out["final"] is not None:
        final = out["final"]
        # FINAL may hold plain data (a dict, list, number), not only text.
        parts.append("[FINAL]\n" + (final if isinstance(final, str) else json.dumps(final, ensure_ascii=False)))
    if out["sub_calls"]:
        parts.append(f"[{out['sub_calls']} sub-queries]")
    return "\n".join(parts) or "(no output)"


def build_server(runner: QueryRunner, sessions: SessionManager, options: McpOptions) -> MCPServer:
    """The MCP server with the rlm_query and repl_* tools over ``runner`` and ``sessions``."""
    server: MCPServer = MCPServer(
        "rlm",
        version=package_version(),
        instructions=(
            "rlm answers questions over contexts far larger than your window. rlm_query runs a "
            "whole Recursive Language Model (a root model writing code over the context, fanning "
            "out sub-queries). repl_open/repl_exec/repl_close give you the sandboxed REPL itself: "
            "`context` is a variable, llm_query(prompt) and llm_query_batch(prompts) ask a "
            "sub-model concurrently, print() shows results."
        ),
    )
    allow_dirs = options.allow_dirs

    async def rlm_query(
        query: str,
        ctx: Context,
        context: JSONContext = None,
        context_path: str | None = None,
        schema: dict[str, Any] | None = None,
        max_cost_usd: float | None = None,
    ) -> Annotated[CallToolResult, QueryOutput]:
        """Answer `query` over a large context with a Recursive Language Model.

        Pass the context inline (text, or JSON such as a list of documents) or as
        `context_path`, a file under one of the server's --allow-dir directories.
        `schema` (a JSON Schema) asks for a typed answer: it is validated, and returned
        as `output` in the structured content. `max_cost_usd` lowers the server's cost
        budget for this run. Progress arrives as progress notifications; cancelling the
        call cancels the run. A run stopped at the iteration limit without a final
        answer returns no answer (stopped_reason "max_iterations").
        """
        if not query.strip():
            raise ToolError("query must be a non-empty question")
        value = _context_from(context, context_path, allow_dirs, required=False)
        try:
            async with _progress_to(ctx) as progress:
                result = await runner.run(context=value, query=query, schema=schema,
                                          max_cost_usd=max_cost_usd, on_event=progress.sink)
        except ConfigError as exc:
            raise ToolError(str(exc)) from None
        answer = served_answer(result) or None
        meta = result_metadata(result)
        structured = QueryOutput(answer=answer, **meta).model_dump(mode="json")
        if answer is not None:
            text = answer
        elif result.stopped_reason == "max_iterations":
            text = (f"the run reached the iteration limit ({result.iterations} turns) without a "
                    "final answer")
        else:
            text = f"the run ended without an answer ({result.stopped_reason}): {result.error}"
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured,
                              is_error=answer is None)

    async def repl_open(ctx: Context, context: JSONContext = None,
                        context_path: str | None = None) -> Annotated[CallToolResult, OpenOutput]:
        """Open a sandboxed Python REPL session holding the context as the variable `context`.

        Give the context inline or as `context_path` (under an --allow-dir directory).
        Returns the session_id for repl_exec and repl_close. Sessions close themselves
        after the server's idle timeout.
        """
        value = _context_from(context, context_path, allow_dirs, required=True)
        try:
            session_id, description = await sessions.open(value, owner=_client_session(ctx))
        except SessionError as exc:
            raise ToolError(str(exc)) from None
        out = OpenOutput(session_id=session_id, context=description, sandbox=sessions.sandbox,
                         idle_timeout_s=sessions.idle_timeout_s)
        text = f"session_id: {session_id}\ncontext: {description}"
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=out.model_dump(mode="json"))

    async def repl_exec(session_id: str, code: str, ctx: Context) -> Annotated[CallToolResult, ExecOutput]:
        """Run Python code in the session; variables persist between calls.

        Available: `context`, `llm_query(prompt) -> str`, `llm_query_batch(prompts) -> list[str]`
        (concurrent sub-model calls, order kept), their async forms (`await
        llm_query_async(...)`, `await llm_query_batch_async(...)`), `FINAL(answer)`,
        `print`. Returns stdout, stderr, the error if any and the sub-query count, cut
        to the server's output budget.
        """
        try:
            async with _progress_to(ctx) as progress:

                def on_item(done: int, total: int) -> None:  # called on the engine thread
                    if done == total or done % max(1, total // 50) == 0:
                        progress.sink({"type": "subcalls", "done": done, "total": total})

                out = await sessions.execute(session_id, code, progress=on_item, owner=_client_session(ctx))
        except SessionError as exc:
            raise ToolError(str(exc)) from None
        return CallToolResult(content=[TextContent(type="text", text=_exec_text(out))],
                              structured_content=ExecOutput(**out).model_dump(mode="json"),
                              is_error=out["error"] is not None)

    async def repl_close(session_id: str, ctx: Context) -> Annotated[CallToolResult, CloseOutput]:
        """Close the REPL session and stop its worker."""
        try:
            await sessions.close(session_id, owner=_client_session(ctx))
        except SessionError as exc:
            raise ToolError(str(exc)) from None
        return CallToolResult(content=[TextContent(type="text", text=f"closed {session_id}")],
                              structured_content=CloseOutput(session_id=session_id, closed=True).model_dump())

    def add(tool: Any, annotations: ToolAnnotations) -> None:
        # Dedented: clients show the description as it comes, indentation and all.
        server.add_tool(tool, description=inspect.cleandoc(tool.__doc__ or ""), annotations=annotations)

    add(rlm_query, ToolAnnotations(title="Ask an RLM", read_only_hint=True, open_world_hint=True))
    add(repl_open, ToolAnnotations(title="Open a REPL session"))
    add(repl_exec, ToolAnnotations(title="Run code in a REPL session", open_world_hint=True))
    add(repl_close, ToolAnnotations(title="Close a REPL session", destructive_hint=True,
                                    idempotent_hint=True))
    return server


class _BearerGate:
    """ASGI wrapper: only the MCP endpoint exists (404 elsewhere, OAuth discovery paths
    included), and without ``Authorization: Bearer <key>`` it answers 401 with a plain
    Bearer challenge (RFC 6750, no ``resource_metadata``: there is no OAuth server)."""

    def __init__(self, app: Any, auth_key: str | None) -> None:
        self.app = app
        self.auth_key = auth_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope.get("path", "").rstrip("/") != MCP_PATH:
                await _send_json(send, 404, {"error": {
                    "message": f"not found: rlm mcp serves MCP at {MCP_PATH} only, with no OAuth; "
                               "send the key as Authorization: Bearer <key>",
                    "type": "invalid_request_error", "code": "not_found"}})
                return
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            sent = headers.get("authorization")
            if not bearer_matches(sent, self.auth_key):
                # A wrong key is an invalid token; a missing one gets the bare challenge.
                challenge = 'Bearer realm="rlm mcp"' + (', error="invalid_token"' if sent else "")
                await _send_json(send, 401, {"error": {
                    "message": "missing or wrong bearer key: send Authorization: Bearer <the key "
                               "rlm mcp was started with (--auth-key or RLM_SERVE_AUTH_KEY)>",
                    "type": "invalid_request_error", "code": "invalid_api_key"}},
                    [(b"www-authenticate", challenge.encode())])
                return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def _serve_http(server: MCPServer, options: McpOptions) -> None:
    import uvicorn

    host, port = options.http_host or "127.0.0.1", options.http_port or 0
    app = _BearerGate(server.streamable_http_app(streamable_http_path=MCP_PATH, host=host,
                                                 max_request_body_size=MAX_HTTP_BODY_BYTES),
                      options.auth_key)
    # Bind here, not in uvicorn, so the ready line can name the real port (with port 0).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another "
                          "--http HOST:PORT (port 0 picks a free one)") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"rlm mcp: streamable HTTP on http://{shown}:{bound}/mcp", file=sys.stderr, flush=True)
    # uvicorn shuts down on SIGINT/SIGTERM, then re-raises the signal to the handler it
    # found: make that a no-op so the sessions and clients below are still closed.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()


async def _main(settings: UpstreamSettings, options: McpOptions) -> None:
    runner = QueryRunner(settings)
    sessions = SessionManager(
        runner.sub_client,
        sandbox=runner.sandbox,
        max_sessions=options.max_sessions,
        idle_timeout_s=options.session_idle_s,
        max_output_chars=options.max_output_chars,
        cell_timeout_s=options.cell_timeout_s,
        max_tokens=settings.max_tokens,
        max_cost_usd=settings.max_cost_usd,
    )
    server = build_server(runner, sessions, options)
    try:
        async with sessions.reaping():
            if options.http_host is not None:
                await _serve_http(server, options)
            else:
                main = asyncio.current_task()
                loop = asyncio.get_running_loop()
                if main is not None:
                    # SIGTERM ends the session cleanly: workers stopped, clients closed.
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.add_signal_handler(signal.SIGTERM, main.cancel)
                with contextlib.suppress(asyncio.CancelledError):
                    await server.run_stdio_async()
    finally:
        await runner.aclose()


def run_mcp(settings: UpstreamSettings, options: McpOptions) -> None:
    """Run ``rlm mcp`` until stdin closes (stdio) or SIGINT/SIGTERM (HTTP)."""
    if options.http_host is not None:
        check_bind(options.http_host, options.auth_key)
    for name, value in (("--max-sessions", options.max_sessions), ("--max-output-chars", options.max_output_chars)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1")
    if options.max_output_chars < 100:
        raise ConfigError("--max-output-chars must be at least 100")
    # The SDKs leave hundreds of thousands of long-lived objects; frozen, they are skipped
    # by every collection, including the one at exit that took seconds on a busy machine
    # (longer than MCP clients wait before killing a server after closing its stdin).
    gc.collect()
    gc.freeze()
    asyncio.run(_main(settings, options))
