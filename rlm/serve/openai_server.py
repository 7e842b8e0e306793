"""``rlm serve``: an OpenAI-compatible HTTP server whose one model is an RLM.

``POST /v1/chat/completions`` runs one RLM per request: the last user message is the
query, the text of every earlier message is the context, and ``"rlm": {...}`` in the
body (``extra_body`` in the OpenAI SDK) may override the context, read it from a file
under ``--allow-dir`` (a relative path is taken under the first one), lower the cost
budget or ask for a schema. The standard ways to ask for structured output work too:
``response_format`` of type ``json_schema`` (the answer is the validated JSON) or
``json_object`` (served as the schema ``{"type": "object"}``), and ``tools`` with a
``tool_choice`` that names one function (or ``"required"`` with one tool): the
function's parameters are the schema and the answer comes back as that tool call
(``finish_reason: "tool_calls"``, the arguments as JSON text). An RLM cannot choose
between tools or answer in free text instead of calling one, so any other use of
tools is a 400. ``GET /v1/models`` lists ``rlm`` and ``rlm:<root-model>``.

A run that reaches its iteration limit answers 200 with ``finish_reason: "length"`` and
``rlm.stopped_reason: "max_iterations"``; the content is the answer the root model gave
with ``FINAL`` in its last turn, or empty when it gave none: its raw last reply (often
REPL code) is never presented as an answer.

Streaming (``"stream": true``) sends progress as it happens in chunks whose choice has
an empty delta and whose extra ``rlm`` field carries the event (strict clients such as
the openai SDK read them as empty chunks; ``"rlm": {"progress": "content"}`` puts the
progress lines into the content instead, for chat front-ends that only show content),
then the answer, a finish chunk with the run's ``rlm`` metadata, and ``[DONE]``; as
OpenAI does, a usage chunk with no choices comes before ``[DONE]`` only when the
request has ``"stream_options": {"include_usage": true}``.

The HTTP stack is aiohttp: it is already installed (the client's transport), it runs on
our own event loop, it cancels a handler when its client disconnects (which cancels the
run and its in-flight model requests) and it bounds request bodies itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from rlm.core import RLMResult
from rlm.errors import AccessDeniedError, ConfigError
from rlm.serve.auth import HostRule, bearer_matches, check_bind, is_json_content_type
from rlm.serve.paths import AllowedDirs
from rlm.serve.runs import (
    QueryRunner,
    RunProgress,
    accept_remote_schema,
    progress_message,
    result_metadata,
    served_answer,
)

__all__ = ["ServeOptions", "build_app", "serve"]

MODEL_ID = "rlm"
_RLM_OPTIONS = frozenset({"context", "context_path", "max_cost_usd", "schema", "progress"})
_HEARTBEAT_S = 15.0


@dataclass
class ServeOptions:
    """How ``rlm serve`` listens and what it admits.

    ``max_running`` runs execute at once and up to ``max_queue`` more wait; beyond that
    a request gets 429 with Retry-After. ``max_body_bytes`` bounds a request body (413).
    ``allowed_hosts`` adds to the Host and Origin names answered (see ``HostRule``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    auth_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_running: int = 8
    max_queue: int = 32
    allow_dirs: AllowedDirs = field(default_factory=lambda: AllowedDirs(()))
    allowed_hosts: tuple[str, ...] = ()


class _RequestError(Exception):
    """A request the server refuses, rendered in the OpenAI error format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
            **self.extra,
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


class _Admission:
    """At most ``running`` runs at once and ``queue`` waiting; the rest are turned away."""

    def __init__(self, running: int, queue: int) -> None:
        self._slots = asyncio.Semaphore(running)
        self._limit = running + queue
        self._admitted = 0
        self._mean_run_s = 1.0

    def enter(self) -> None:
        if self._admitted >= self._limit:
            raise _RequestError(
                429,
                f"rlm serve is busy: {self._limit} requests are running or queued; retry later",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after())},
            )
        self._admitted += 1

    def leave(self) -> None:
        self._admitted -= 1

    def retry_after(self) -> int:
        # A slot frees roughly every mean run time; never advise less than a second.
        return max(1, math.ceil(self._mean_run_s))

    def record(self, seconds: float) -> None:
        self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * seconds

    @contextlib.asynccontextmanager
    async def slot(self) -> Any:
        self.enter()
        try:
            async with self._slots:
                started = time.monotonic()
                try:
                    yield
                finally:
                    self.record(time.monotonic() - started)
        finally:
            self.leave()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@dataclass
class _ChatRequest:
    model: str
    root_model: str | None
    query: str
    context: Any
    stream: bool
    max_cost_usd: float | None
    schema: Any
    progress_in_content: bool
    # The function a forced tool_choice names: the answer is sent as a call to it.
    tool: str | None = None
    include_usage: bool = False


def _forced_tool(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(name, parameter schema) of the one function the request forces, or None when it
    uses no tools; any tool use an RLM cannot serve is a 400."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise _RequestError(400, "the legacy 'functions' parameters are not supported: use 'tools' "
                            "with a 'tool_choice' that names one function", param="functions")
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise _RequestError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if choice == "none":
        return None  # the client asks for a plain answer: the tools are not used
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in tools
    ):
        raise _RequestError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": "
                            "{\"name\", \"parameters\"}} objects", param="tools")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise _RequestError(400, f"'tool_choice' names {name!r}, which is not in 'tools'",
                                param="tool_choice")
    elif choice == "required" and len(functions) == 1:
        name = next(iter(functions))
    else:
        raise _RequestError(
            400,
            "rlm serve answers with a tool call only when 'tool_choice' names one function "
            "({\"type\": \"function\", \"function\": {\"name\": ...}}, or \"required\" with one tool): "
            "an RLM cannot choose between tools or decide whether to call one",
            code="unsupported_tool_choice",
            param="tool_choice",
        )
    parameters = functions[name].get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise _RequestError(400, f"the parameters of tool {name!r} must be a JSON Schema object",
                            param="tools")
    return name, parameters


def _response_format_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a standard ``response_format`` asks for, or None for plain text."""
    response_format = body.get("response_format")
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        # The standard way to ask for structured output (the SDK's .parse() sends it).
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _RequestError(400, "response_format.json_schema.schema must be a JSON Schema object",
                                param="response_format")
        return schema
    raise _RequestError(400, "response_format.type must be 'text', 'json_object' or 'json_schema'",
                        param="response_format")


def _parse_request(body: Any, runner: QueryRunner, allow_dirs: AllowedDirs) -> _ChatRequest:
    if not isinstance(body, dict):
        raise _RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _RequestError(400, "'model' is required: use 'rlm' or 'rlm:<root-model>'", param="model")
    if model == MODEL_ID:
        root_model = None
    elif model.startswith(MODEL_ID + ":") and len(model) > len(MODEL_ID) + 1:
        root_model = model[len(MODEL_ID) + 1 :]
        try:
            runner.check_root_model(root_model)
        except ConfigError as exc:
            raise _RequestError(404, str(exc), code="model_not_found", param="model") from None
    else:
        raise _RequestError(
            404,
            f"the model {model!r} does not exist on this server: use 'rlm' or 'rlm:<root-model>' "
            f"(e.g. 'rlm:{runner.root_model}')",
            code="model_not_found",
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _RequestError(400, "'messages' must be a list of message objects", param="messages")
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
    if last_user is None:
        raise _RequestError(400, "the messages hold no user message to answer", param="messages")
    query = _text_of(messages[last_user].get("content"))
    if not query.strip():
        raise _RequestError(400, "the last user message is empty", param="messages")
    earlier = [m for m in messages[:last_user] if _text_of(m.get("content"))]
    context: Any
    if len(earlier) == 1:
        context = _text_of(earlier[0].get("content"))
    else:
        context = "\n\n".join(f"{m.get('role', 'user')}: {_text_of(m.get('content'))}" for m in earlier)
    options = body.get("rlm") or {}
    if not isinstance(options, dict):
        raise _RequestError(400, "'rlm' must be an object", param="rlm")
    unknown = sorted(set(options) - _RLM_OPTIONS)
    if unknown:
        raise _RequestError(
            400,
            f"unknown 'rlm' option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(_RLM_OPTIONS))}",
            param="rlm",
        )
    if options.get("context") is not None and options.get("context_path") is not None:
        raise _RequestError(400, "give 'rlm.context' or 'rlm.context_path', not both", param="rlm")
    if options.get("context") is not None:
        context = options["context"]
    elif options.get("context_path") is not None:
        try:
            context = allow_dirs.read_text(options["context_path"])
        except FileNotFoundError as exc:
            raise _RequestError(404, str(exc), code="not_found", param="rlm.context_path") from None
        except AccessDeniedError as exc:
            raise _RequestError(403, str(exc), type_="permission_error", param="rlm.context_path") from None
    tool = _forced_tool(body)
    formats = (("'rlm.schema'", options.get("schema")), ("'response_format'", _response_format_schema(body)),
               ("a forced tool call", tool[1] if tool else None))
    asked = [(where, value) for where, value in formats if value is not None]
    if len(asked) > 1:
        raise _RequestError(400, f"ask for one answer format, not {' and '.join(w for w, _ in asked)}")
    schema = asked[0][1] if asked else None
    if schema is not None:
        if not isinstance(schema, dict):
            raise _RequestError(400, "'rlm.schema' must be a JSON Schema object", param="rlm.schema")
    progress = options.get("progress", "field")
    if progress not in ("field", "content"):
        raise _RequestError(400, "'rlm.progress' must be 'field' or 'content'", param="rlm.progress")
    try:
        max_cost = runner.budget(options.get("max_cost_usd"))
    except ConfigError as exc:
        raise _RequestError(400, str(exc), param="rlm.max_cost_usd") from None
    return _ChatRequest(
        model=model,
        root_model=root_model,
        query=query,
        context=context,
        stream=bool(body.get("stream")),
        max_cost_usd=max_cost,
        schema=schema,
        progress_in_content=progress == "content",
        tool=tool[0] if tool else None,
        include_usage=_include_usage(body),
    )


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(result: RLMResult) -> dict[str, Any]:
    total = result.total_usage
    # OpenAI's shape, details included, so a client's own cost accounting prices the
    # cached input the upstream provider served at its discount.
    return {
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "total_tokens": total.total_tokens,
        "prompt_tokens_details": {"cached_tokens": total.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": total.reasoning_tokens},
    }


_FAILURES = {
    # No answer: 402 when a budget ran out and 422 when the answer never matched the
    # schema (retrying the same request would not help; neither is retried by SDKs),
    # 502 otherwise (the upstream model or the run failed; a retry may succeed).
    "budget": (402, "rlm_budget_exceeded"),
    "invalid_answer": (422, "rlm_invalid_answer"),
}


def _failure(result: RLMResult) -> _RequestError:
    status, type_ = _FAILURES.get(result.stopped_reason, (502, "rlm_run_failed"))
    return _RequestError(
        status,
        f"the RLM run ended without an answer ({result.stopped_reason}): {result.error}",
        type_=type_,
        code=result.stopped_reason,
        extra={"rlm": result_metadata(result)},
    )


def _finish_reason(result: RLMResult, chat: _ChatRequest) -> str:
    if result.stopped_reason != "final":
        return "length"
    return "tool_calls" if chat.tool is not None else "stop"


def _answer_fields(answer: str, chat: _ChatRequest) -> dict[str, Any]:
    """The answer as message (or delta) fields: content, or the forced tool's call."""
    if chat.tool is None or not answer:
        return {"content": answer}
    call = {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": chat.tool, "arguments": answer}}
    return {"content": None, "tool_calls": [call]}


class _ChatServer:
    def __init__(self, runner: QueryRunner, options: ServeOptions) -> None:
        self.runner = runner
        self.options = options
        self.admission = _Admission(options.max_running, options.max_queue)
        self.hosts = HostRule(options.host, options.allowed_hosts)

    @web.middleware
    async def errors_and_auth(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            refused = self.hosts.refusal(request.headers.get("Host"), request.headers.get("Origin"))
            if refused is not None:
                status, message = refused
                raise _RequestError(status, message, type_="permission_error",
                                    code="misdirected_request" if status == 421 else "origin_not_allowed")
            if not bearer_matches(request.headers.get("Authorization"), self.options.auth_key):
                raise _RequestError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with the key this "
                    "server was started with (--auth-key or RLM_SERVE_AUTH_KEY)",
                    code="invalid_api_key",
                )
            response: web.StreamResponse = await handler(request)
            return response
        except _RequestError as exc:
            return exc.response()
        except web.HTTPRequestEntityTooLarge:
            return _RequestError(
                413,
                f"the request body is larger than this server's limit of {self.options.max_body_bytes:,} "
                "bytes (--max-body-mb); send a large context with rlm.context_path instead",
                code="request_too_large",
            ).response()
        except web.HTTPException as exc:
            return _RequestError(exc.status, exc.reason).response()

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        ids = [MODEL_ID, f"{MODEL_ID}:{self.runner.root_model}"]
        return web.json_response(
            {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "rlm"} for i in ids]}
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not is_json_content_type(request.headers.get("Content-Type")):
            raise _RequestError(
                415, "the request body must be sent as Content-Type: application/json",
                code="unsupported_media_type",
            )
        length = request.content_length
        if length is not None and length > self.options.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(self.options.max_body_bytes, length)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _RequestError(400, f"the request body is not valid JSON: {exc}") from None
        chat = _parse_request(body, self.runner, self.options.allow_dirs)
        if chat.schema is not None:
            # Refused before the request queues; accepting a large schema takes a moment,
            # in a validation thread, so other requests are served meanwhile.
            try:
                chat.schema = await accept_remote_schema(chat.schema)
            except ConfigError as exc:
                raise _RequestError(400, str(exc), param="rlm.schema") from None
        async with self.admission.slot():
            if chat.stream:
                return await self._stream(request, chat)
            result = await self._run(chat, None)
        answer = served_answer(result)
        if answer is None:
            raise _failure(result)
        return web.json_response(
            {
                "id": _completion_id(),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", **_answer_fields(answer, chat)},
                        "finish_reason": _finish_reason(result, chat),
                    }
                ],
                "usage": _usage(result),
                "rlm": result_metadata(result),
            }
        )

    async def _run(self, chat: _ChatRequest, progress: RunProgress | None) -> RLMResult:
        try:
            return await self.runner.run(
                context=chat.context,
                query=chat.query,
                model=chat.root_model,
                max_cost_usd=chat.max_cost_usd,
                schema=chat.schema,
                on_event=progress.sink if progress is not None else None,
            )
        except ConfigError as exc:
            raise _RequestError(400, str(exc)) from None

    async def _stream(self, request: web.Request, chat: _ChatRequest) -> web.StreamResponse:
        progress = RunProgress()
        run = asyncio.ensure_future(self._run(chat, progress))
        run.add_done_callback(lambda _: progress.finish())
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        cid, created = _completion_id(), int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }

        async def send(data: dict[str, Any] | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await response.write(f"data: {text}\n\n".encode())

        try:
            await response.prepare(request)
            await send(chunk({"role": "assistant", "content": ""}))
            while True:
                try:
                    event = await asyncio.wait_for(progress.next(), _HEARTBEAT_S)
                except TimeoutError:
                    # An SSE comment keeps proxies from closing a quiet stream; clients skip it.
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                message = progress_message(event)
                if message is None:
                    continue
                info = {"event": event.get("type"), "message": message}
                for key in ("iteration", "done", "total", "sub_calls"):
                    if key in event:
                        info[key] = event[key]
                if chat.progress_in_content:
                    await send(chunk({"content": f"> {message}\n"}))
                else:
                    await send(chunk({}, rlm=info))
            try:
                result = run.result()
            except _RequestError as exc:
                await send(exc.body())
                await send("[DONE]")
                return response
            except Exception as exc:  # noqa: BLE001 - the client must hear why the stream ends
                await send(_RequestError(500, f"the run failed: {exc}", type_="server_error").body())
                await send("[DONE]")
                return response
            answer = served_answer(result)
            if answer is None:
                await send(_failure(result).body())
            else:
                fields = _answer_fields(answer, chat)
                if fields.get("tool_calls"):
                    fields = {"tool_calls": [{"index": 0, **fields["tool_calls"][0]}]}
                elif answer and chat.progress_in_content:
                    fields = {"content": "\n" + answer}
                if answer:
                    await send(chunk(fields))
                await send(chunk({}, _finish_reason(result, chat), rlm=result_metadata(result)))
                if chat.include_usage:
                    await send({**chunk({}), "choices": [], "usage": _usage(result)})
            await send("[DONE]")
            await response.write_eof()
            return response
        finally:
            # A disconnect (the handler is cancelled, or a write fails) ends the run too.
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run


def _completion_id() -> str:
    return "chatcmpl-rlm-" + secrets.token_hex(12)


def build_app(runner: QueryRunner, options: ServeOptions) -> web.Application:
    """The aiohttp application of ``rlm serve`` (routes, auth, limits) over ``runner``."""
    server = _ChatServer(runner, options)
    # aiohttp enforces client_max_size while reading; the handler checks Content-Length first.
    app = web.Application(middlewares=[server.errors_and_auth], client_max_size=options.max_body_bytes)
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/chat/completions", server.chat)
    return app


async def serve(runner: QueryRunner, options: ServeOptions, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop runs, close the clients and return.

    ``on_ready`` gets the base URL (``http://host:port/v1``) once the socket listens.
    """
    check_bind(options.host, options.auth_key)
    app = build_app(runner, options)
    # The long-lived objects of the SDKs, frozen, are no longer rescanned by every full
    # collection while serving, nor by the one at exit.
    gc.collect()
    gc.freeze()
    app_runner = web.AppRunner(app, handler_cancellation=True, access_log=_access_log(),
                               access_log_format='%a "%r" %s %b %Tfs')
    await app_runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(app_runner, options.host, options.port)
        try:
            await site.start()
        except OSError as exc:
            # aiohttp words a busy port at length; the OS's own words are enough.
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
            raise ConfigError(f"cannot listen on {options.host}:{options.port}: {reason}; check --host, "
                              "or pick another --port (0 picks a free one)") from None
        sockets = app_runner.addresses
        port = sockets[0][1] if sockets else options.port
        host = f"[{options.host}]" if ":" in options.host else options.host
        url = f"http://{host}:{port}/v1"
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
    finally:
        await app_runner.cleanup()
        await runner.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _access_log() -> logging.Logger:
    # One line per request on stderr: client, request line, status, bytes, seconds.
    logger = logging.getLogger("rlm.serve.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("rlm serve: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def print_ready(url: str, runner: QueryRunner) -> None:
    """The line ``rlm serve`` prints once listening (tests wait for it)."""
    print(
        f"rlm serve: listening on {url} (models: {MODEL_ID}, {MODEL_ID}:{runner.root_model})",
        file=sys.stderr,
        flush=True,
    )
