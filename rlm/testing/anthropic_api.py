"""Anthropic's wire format: the Messages API, its streaming events, errors and headers.

Holds the checks Anthropic makes before anything else (a key in ``x-api-key`` or
``Authorization: Bearer``, an ``anthropic-version`` header), the parsing of a Messages
body into a :class:`ChatCall` (system prompt first, content blocks as text, a forced
``tool_choice`` as a structured call, ``cache_control`` breakpoints), the rendering of
answers, faults and refusals in Anthropic's shapes (``message``, SSE events,
``{"type": "error", ...}``, ``anthropic-ratelimit-*`` headers with RFC 3339 resets), and
the routes ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``. It must not
hold the pipeline (the hub) or Message Batches (``batches``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from rlm.testing.caching import PromptCache
from rlm.testing.faults import Fault
from rlm.testing.hub import Hub
from rlm.testing.limits import Admission, rfc3339_in
from rlm.testing.model import Answer, ChatCall, Refusal, tokens
from rlm.testing.wire import SSE_TYPE, Payload, json_payload, protocol_free_fault, respond

__all__ = [
    "AnthropicWire",
    "check_headers",
    "error_body",
    "error_payload",
    "message_body",
    "messages_call",
    "parse_messages",
]

_ENC = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str, type_: str | None = None) -> dict[str, Any]:
    """Anthropic's error object: ``{"type": "error", "error": {"type", "message"}}``."""
    return {
        "type": "error",
        "error": {"type": type_ or _TYPES.get(status, "api_error"), "message": message},
        "request_id": "req_fake",
    }


def error_payload(
    status: int, message: str, type_: str | None = None, headers: dict[str, str] | None = None
) -> Payload:
    """An Anthropic error reply."""
    return json_payload(status, error_body(status, message, type_), headers)


def check_headers(request: web.Request) -> Payload | None:
    """The 401 or 400 Anthropic gives a request without a key or without
    ``anthropic-version``; None when both are there."""
    headers = request.headers
    bearer = headers.get("Authorization", "").startswith("Bearer ")
    if not headers.get("x-api-key") and not bearer:
        return error_payload(401, "x-api-key header is required")
    if not headers.get("anthropic-version"):
        return error_payload(400, "anthropic-version: header is required")
    return None


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "tool_use":
        return _ENC(block.get("input", {}))
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return "".join(_block_text(part) for part in content)
        return str(content or "")
    return ""


def _blocks(content: Any) -> list[Any]:
    return content if isinstance(content, list) else [content]


def parse_messages(body: bytes) -> ChatCall | Payload:
    """A Messages body as a :class:`ChatCall` whose messages are in OpenAI's shape (the
    system prompt first), or the 400 it deserves. ``max_tokens`` is required, as it is by
    Anthropic; ``cache_control`` breakpoints are kept for the prompt cache."""
    try:
        request = json.loads(body)
    except ValueError as exc:
        return error_payload(400, f"There was an error parsing the body: {exc}")
    return messages_call(request)


def messages_call(request: Any) -> ChatCall | Payload:
    """A decoded Messages body as a :class:`ChatCall`, or the 400 it deserves."""
    if not isinstance(request, dict):
        return error_payload(400, "The body must be a JSON object")
    model = request.get("model")
    messages = request.get("messages")
    max_tokens = request.get("max_tokens")
    if not isinstance(model, str):
        return error_payload(400, "model: Field required")
    if not isinstance(messages, list):
        return error_payload(400, "messages: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return error_payload(400, "max_tokens: Field required (an integer >= 1)")
    cache_blocks: list[tuple[str, bool]] = []
    tools = request.get("tools") if isinstance(request.get("tools"), list) else []
    for tool in tools:
        if isinstance(tool, dict):
            cache_blocks.append((_ENC(tool), "cache_control" in tool))
    normal: list[dict[str, Any]] = []
    system = request.get("system")
    if system:
        parts = _blocks(system)
        for part in parts:
            cache_blocks.append((_block_text(part), isinstance(part, dict)
                                 and "cache_control" in part))
        normal.append({"role": "system", "content": "".join(_block_text(p) for p in parts)})
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return error_payload(400, "messages: each message needs role 'user' or 'assistant'")
        parts = _blocks(message.get("content"))
        for part in parts:
            cache_blocks.append((_block_text(part), isinstance(part, dict)
                                 and "cache_control" in part))
        normal.append(
            {"role": message["role"], "content": "".join(_block_text(p) for p in parts)}
        )
    tool = _forced_tool(request.get("tool_choice"), tools)
    response_format = None
    if tool is not None:
        response_format = {
            "type": "json_schema", "json_schema": {"name": tool[0], "schema": tool[1]},
        }
    params = {k: v for k, v in request.items() if k not in ("model", "messages")}
    call = ChatCall(
        protocol="anthropic",
        model=model,
        messages=normal,
        stream=request.get("stream") is True,
        response_format=response_format,
        tool=tool[0] if tool is not None else None,
        max_tokens=max_tokens,
        params=params,
        prompt_chars=sum(len(text) for text, _ in cache_blocks) or 1,
        cache_blocks=cache_blocks,
        sent_messages=messages,
    )
    return call


def _forced_tool(choice: Any, tools: list[Any]) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(choice, dict):
        return None
    named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if choice.get("type") == "tool":
        named = [t for t in named if t["name"] == choice.get("name")]
    elif not (choice.get("type") == "any" and len(named) == 1):
        return None
    if not named:
        return None
    schema = named[0].get("input_schema")
    return named[0]["name"], schema if isinstance(schema, dict) else {"type": "object"}


def usage_of(answer: Answer, cache_read: int, cache_created: int) -> dict[str, Any]:
    """Anthropic's usage object: ``input_tokens`` are the prompt's tokens neither read from
    nor written to the cache."""
    return {
        "input_tokens": max(0, answer.prompt_tokens - cache_read - cache_created),
        "cache_creation_input_tokens": cache_created,
        "cache_read_input_tokens": cache_read,
        "output_tokens": answer.completion_tokens,
    }


def message_body(
    call: ChatCall, answer: Answer, ident: str, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``message`` object for ``answer`` (a ``tool_use`` block for a forced tool)."""
    if answer.tool_input is not None:
        content: list[dict[str, Any]] = [
            {"type": "tool_use", "id": f"toolu_{ident[4:]}", "name": call.tool,
             "input": answer.tool_input}
        ]
        stop = "tool_use"
    else:
        content = [{"type": "text", "text": answer.text}]
        stop = "end_turn"
    body: dict[str, Any] = {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {_ENC(data)}\n\n"


class AnthropicWire:
    """Renders the pipeline's outcomes as Anthropic Messages replies."""

    def __init__(self, ids: Callable[[], int], cache: PromptCache | None) -> None:
        self._next_id = ids
        self._cache = cache

    def cache_usage(self, call: ChatCall, answer: Answer) -> dict[str, Any]:
        """The usage object for ``answer``, with the prompt cache's reads and writes."""
        read = created = 0
        if self._cache is not None and call.cache_blocks:
            read, created = self._cache.anthropic_usage(call.model, call.cache_blocks)
        return usage_of(answer, read, created)

    def message(self, call: ChatCall, answer: Answer) -> dict[str, Any]:
        """The ``message`` object for ``answer``, its usage counted."""
        ident = f"msg_fake{self._next_id()}"
        return message_body(call, answer, ident, self.cache_usage(call, answer))

    def answer(self, call: ChatCall, answer: Answer, fault: Fault | None) -> Payload:
        """A ``message`` (or its SSE events); ``fault`` shapes it wrongly."""
        kind = fault.kind if fault is not None else None
        headers = {"request-id": f"req_fake{self._next_id()}"}
        if fault is not None:
            headers.update(fault.retry_headers())
        usage = None if kind == "no_usage" else self.cache_usage(call, answer)
        call.usage = usage
        ident = f"msg_fake{self._next_id()}"
        if not call.stream:
            if kind == "stream_error":
                return self._error_event_body(fault, headers)
            payload = json_payload(200, message_body(call, answer, ident, usage), headers)
            if kind == "cut":
                payload.action = "truncate"
            return payload
        start = message_body(call, answer, ident, None)
        start.update(content=[], stop_reason=None)
        if usage is not None:
            start["usage"] = {**usage, "output_tokens": 1}
        events = [_event("message_start", {"type": "message_start", "message": start})]
        text = answer.text
        size = max(1, -(-len(text) // 4))
        if answer.tool_input is not None:
            block = {"type": "tool_use", "id": f"toolu_{ident[4:]}", "name": call.tool,
                     "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": text[i : i + size]}
                      for i in range(0, len(text), size)]
            stop = "tool_use"
        else:
            block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": text[i : i + size]}
                      for i in range(0, len(text), size)]
            stop = "end_turn"
        events.append(_event("content_block_start",
                             {"type": "content_block_start", "index": 0, "content_block": block}))
        events.append(_event("ping", {"type": "ping"}))
        body_events = [
            _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
            for d in deltas
        ]
        if kind == "cut":
            events += body_events[:1]
        elif kind == "stream_error":
            events += body_events[:1]
            events.append(_event("error", self._stream_error(fault)))
        else:
            events += body_events
            events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
            delta: dict[str, Any] = {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
            }
            if usage is not None:
                delta["usage"] = {"output_tokens": usage["output_tokens"]}
            events.append(_event("message_delta", delta))
            events.append(_event("message_stop", {"type": "message_stop"}))
        return Payload(200, "".join(events).encode(), SSE_TYPE,
                       {"Cache-Control": "no-cache", **headers})

    def _stream_error(self, fault: Fault | None) -> dict[str, Any]:
        status = (fault.status if fault is not None else None) or 429
        messages = {429: "Rate limited (simulated).", 529: "Overloaded"}
        message = (fault.message if fault is not None else None) or messages.get(
            status, "Internal server error (simulated)."
        )
        return {"type": "error", "error": {"type": _TYPES.get(status, "api_error"),
                                           "message": message}}

    def _error_event_body(self, fault: Fault | None, headers: dict[str, str]) -> Payload:
        return json_payload(200, self._stream_error(fault), headers)

    def fault(self, call: ChatCall, fault: Fault) -> Payload:
        """The reply for a non-answering fault, in Anthropic's shapes."""
        kind = fault.kind
        headers = fault.retry_headers()
        shared = protocol_free_fault(kind, fault.status, fault.message, headers, call.stream, (
            b'event: message_start\ndata: {"type": "message_start", "mess\n\n',
            b'{"id": "msg_fake", "type": "message", "cont',
        ))
        if shared is not None:
            return shared
        if kind == "context_length":
            prompt = call.prompt_tokens
            return error_payload(
                400,
                fault.message
                or f"prompt is too long: {max(prompt, 200_001)} tokens > 200000 maximum",
                headers=headers,
            )
        status = int(kind)
        default = {
            429: "Number of requests has exceeded your rate limit (simulated).",
            500: "Internal server error (simulated).",
            503: "Service unavailable (simulated).",
            529: "Overloaded",
        }[status]
        return error_payload(status, fault.message or default, headers=headers)

    def refusal(self, call: ChatCall, refusal: Refusal) -> Payload:
        """A refusal as an Anthropic error."""
        return error_payload(refusal.status, refusal.message)

    def limit_headers(self, admission: Admission) -> dict[str, str]:
        """Anthropic's ``anthropic-ratelimit-*`` headers, resets as RFC 3339 times."""
        headers: dict[str, str] = {}
        for state in admission.states:
            name = state.name.replace("_", "-")
            headers[f"anthropic-ratelimit-{name}-limit"] = str(state.limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(state.remaining)
            headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339_in(state.reset_s)
        return headers

    def rate_limited(self, call: ChatCall, admission: Admission) -> Payload:
        """Anthropic's 429 ``rate_limit_error`` for a refused request, with ``retry-after``
        when it would ever fit."""
        bucket = (admission.bucket or "requests").replace("_", " ")
        if admission.wait_s is None:
            return error_payload(
                429,
                f"This request would exceed your organization's rate limit of "
                f"{admission.limit} {bucket} per minute (requested {admission.requested}); "
                "reduce the prompt length or the maximum tokens requested.",
            )
        return error_payload(
            429,
            f"This request would exceed your organization's rate limit of {admission.limit} "
            f"{bucket} per minute (simulated by FakeLLMServer).",
            headers={"retry-after": str(max(1, math.ceil(admission.wait_s)))},
        )


def add_routes(app: web.Application, hub: Hub) -> None:
    """Serve the Messages API on ``app``."""
    wire = AnthropicWire(hub.ids.__next__, hub.cache)

    async def messages(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return respond(error_payload(405, "Method not allowed", "invalid_request_error"))
        refused = check_headers(request)
        if refused is not None:
            return respond(refused)
        call = parse_messages(await request.read())
        if isinstance(call, Payload):
            return respond(call)
        entry = hub.log_entry(request, call, call.sent_messages or [])
        return await hub.exchange(request, call, wire, entry)

    async def count_tokens(request: web.Request) -> web.StreamResponse:
        refused = check_headers(request)
        if refused is not None:
            return respond(refused)
        body = await request.read()
        with_max = body
        try:
            value = json.loads(body)
            if isinstance(value, dict):
                value.setdefault("max_tokens", 1)
                with_max = _ENC(value).encode()
        except ValueError:
            pass
        call = parse_messages(with_max)
        if isinstance(call, Payload):
            return respond(call)
        return respond(json_payload(200, {"input_tokens": tokens(call.prompt_chars)}))

    app.router.add_route("*", "/v1/messages", messages)
    app.router.add_route("POST", "/v1/messages/count_tokens", count_tokens)
