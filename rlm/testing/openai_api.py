"""OpenAI's wire format: chat completions (JSON and SSE), models and errors.

Holds the parsing of a chat completions body into a :class:`ChatCall`, the rendering of
answers, faults and refusals in OpenAI's shapes (``chat.completion``,
``chat.completion.chunk`` events, ``{"error": {...}}`` bodies), and the routes
``POST /v1/chat/completions`` and ``GET /v1/models[/{id}]``. It must not hold the
pipeline (the hub), limits or batches.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from rlm.testing.caching import OPENAI_MIN_CHARS, PromptCache
from rlm.testing.faults import Fault
from rlm.testing.hub import Hub
from rlm.testing.limits import Admission, format_duration
from rlm.testing.model import Answer, ChatCall, Refusal, tokens
from rlm.testing.responders import text_of
from rlm.testing.wire import SSE_TYPE, Payload, json_payload, protocol_free_fault, respond

__all__ = ["OpenAIWire", "chat_call", "error_body", "error_payload", "parse_chat", "usage_of"]

_ENC = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_payload(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Payload:
    """An OpenAI error reply."""
    return json_payload(status, error_body(message, type_, code, param), headers)


def usage_of(answer: Answer) -> dict[str, Any]:
    """OpenAI's usage object for ``answer``, with the cached and reasoning token details."""
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": answer.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def limit_headers(admission: Admission) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the requests and tokens buckets."""
    headers: dict[str, str] = {}
    for state in admission.states:
        if state.name in ("requests", "tokens"):
            headers[f"x-ratelimit-limit-{state.name}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{state.name}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{state.name}"] = format_duration(state.reset_s)
    return headers


_UNITS = {
    "requests": "requests per min (RPM)",
    "tokens": "tokens per min (TPM)",
    "input_tokens": "input tokens per min",
    "output_tokens": "output tokens per min",
}


def rate_limited_payload(call: ChatCall, admission: Admission) -> Payload:
    """OpenAI's 429 for a request its model's limits refused: ``retry-after-ms`` and
    ``retry-after`` say when it would fit; a request larger than the limit says so and
    carries no wait."""
    bucket = admission.bucket or "requests"
    unit = _UNITS.get(bucket, bucket)
    where = f"for {call.model} in organization org-fake on {unit}"
    type_ = "requests" if bucket == "requests" else "tokens"
    if admission.wait_s is None:
        message = (
            f"Request too large {where}: Limit {admission.limit}, Requested "
            f"{admission.requested}. The input or output tokens must be reduced in order to "
            "run successfully."
        )
        return error_payload(429, message, type_, "rate_limit_exceeded")
    wait = admission.wait_s
    message = (
        f"Rate limit reached {where}: Limit {admission.limit}, Requested "
        f"{admission.requested}. Please try again in {format_duration(wait)}. "
        "(simulated by FakeLLMServer)"
    )
    headers = {
        "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
        "retry-after": str(max(1, math.ceil(wait))),
    }
    return error_payload(429, message, type_, "rate_limit_exceeded", headers=headers)


def parse_chat(
    body: bytes, default_model: str | None, protocol: str = "openai"
) -> ChatCall | Payload:
    """A chat completions body as a :class:`ChatCall`, or the 400 reply it deserves. A
    forced function call (``tool_choice`` naming one function) becomes a structured call
    for that function's parameter schema."""
    try:
        request = json.loads(body)
    except ValueError as exc:
        return error_payload(400, f"We could not parse the JSON body of your request: {exc}")
    return chat_call(request, default_model, protocol)


def chat_call(
    request: Any, default_model: str | None, protocol: str = "openai"
) -> ChatCall | Payload:
    """A decoded chat completions body as a :class:`ChatCall` (``protocol`` names the
    dialect it came in), or the 400 it deserves."""
    messages = request.get("messages") if isinstance(request, dict) else None
    model = request.get("model", default_model) if isinstance(request, dict) else None
    if not isinstance(messages, list) or not isinstance(model, str):
        return error_payload(
            400, "The body must be a JSON object with 'model' (a string) and 'messages' (a list)"
        )
    params = {k: v for k, v in request.items() if k != "model" and k != "messages"}
    response_format = request.get("response_format")
    if not isinstance(response_format, dict):
        response_format = None
    tool = _forced_function(request)
    if tool is not None:
        name, schema = tool
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    return ChatCall(
        protocol=protocol,
        model=model,
        messages=messages,
        stream=request.get("stream") is True,
        response_format=response_format,
        tool=tool[0] if tool is not None else None,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        params=params,
    )


def _forced_function(request: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    choice = request.get("tool_choice")
    tools = request.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list):
        return None
    name = (choice.get("function") or {}).get("name")
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            schema = function.get("parameters")
            return str(name), schema if isinstance(schema, dict) else {"type": "object"}
    return None


class OpenAIWire:
    """Renders the pipeline's outcomes as OpenAI chat completions."""

    def __init__(
        self,
        ids: Callable[[], int],
        cache: PromptCache | None = None,
        *,
        protocol: str = "openai",
        cumulative_usage: bool = False,
    ) -> None:
        self._next_id = ids
        self._cache = cache
        self.protocol = protocol
        # Gemini's OpenAI-compatible streams put the running usage on every chunk.
        self._cumulative = cumulative_usage

    def limit_headers(self, admission: Admission) -> dict[str, str]:
        """OpenAI's rate-limit headers."""
        return limit_headers(admission)

    def rate_limited(self, call: ChatCall, admission: Admission) -> Payload:
        """OpenAI's 429 for a refused request."""
        return rate_limited_payload(call, admission)

    # -- answers --------------------------------------------------------------------

    def count_cached(self, call: ChatCall, answer: Answer) -> None:
        """Set ``answer.cached_tokens`` by the prefix rule (and remember the prompt)."""
        if self._cache is not None and call.prompt_chars >= OPENAI_MIN_CHARS:
            parts = [
                (str(m.get("role")), text_of(m.get("content")))
                for m in call.messages
                if isinstance(m, dict)
            ]
            answer.cached_tokens = self._cache.openai_cached_tokens(call.model, parts)

    def completion(
        self, call: ChatCall, answer: Answer, *, usage: bool = True
    ) -> dict[str, Any]:
        """The ``chat.completion`` object for ``answer`` (a ``tool_calls`` message for a
        forced function), cached tokens counted."""
        self.count_cached(call, answer)
        ident = f"chatcmpl-fake{self._next_id()}"
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
        finish = "stop"
        if answer.tool_input is not None:
            message = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": f"call_fake{ident[13:]}",
                        "type": "function",
                        "function": {"name": call.tool, "arguments": answer.text},
                    }
                ],
            }
            finish = "tool_calls"
        body: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
        }
        if usage:
            body["usage"] = usage_of(answer)
        return body

    def answer(self, call: ChatCall, answer: Answer, fault: Fault | None) -> Payload:
        """A ``chat.completion`` (or its SSE stream); ``fault`` shapes it wrongly."""
        kind = fault.kind if fault is not None else None
        headers = fault.retry_headers() if fault is not None else {}
        if not call.stream:
            if kind == "stream_error":
                return json_payload(200, self._stream_error(call, fault), headers)
            body = self.completion(call, answer, usage=kind != "no_usage")
            payload = Payload(200, _ENC(body).encode(), headers=headers)
            if kind == "cut":
                payload.action = "truncate"
            return payload
        self.count_cached(call, answer)
        usage = None if kind == "no_usage" else usage_of(answer)
        ident = f"chatcmpl-fake{self._next_id()}"
        created = int(time.time())
        return self._stream(call, answer, ident, created, usage, fault, headers)

    def _stream(
        self,
        call: ChatCall,
        answer: Answer,
        ident: str,
        created: int,
        usage: dict[str, Any] | None,
        fault: Fault | None,
        headers: dict[str, str],
    ) -> Payload:
        kind = fault.kind if fault is not None else None
        options = call.params.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if usage is None:
            include_usage = False
        # Every chunk shares its envelope, so it is encoded once and only the small
        # deltas are encoded per chunk: this keeps a stream nearly as cheap as a reply.
        envelope = _ENC(
            {"id": ident, "object": "chat.completion.chunk", "created": created,
             "model": call.model}
        )[:-1]
        tail = ',"usage":null}' if include_usage and not self._cumulative else "}"
        text = answer.text
        # A handful of pieces is enough to exercise a client's reassembly.
        size = max(1, -(-len(text) // 4))
        if answer.tool_input is not None:
            call_id = f"call_fake{ident[13:]}"
            first = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"index": 0, "id": call_id, "type": "function",
                     "function": {"name": call.tool, "arguments": ""}}
                ],
            }
            deltas = [_ENC(first)] + [
                _ENC({"tool_calls": [{"index": 0, "function": {"arguments": text[i : i + size]}}]})
                for i in range(0, len(text), size)
            ]
            finish = "tool_calls"
        else:
            deltas = ['{"role":"assistant","content":""}']
            deltas += [_ENC({"content": text[i : i + size]}) for i in range(0, len(text), size)]
            finish = "stop"
        tails = [tail] * len(deltas)
        if self._cumulative and usage is not None:
            # The first delta only opens the message; each later one adds a piece.
            sent = [0] + [min(len(text), size * i) for i in range(1, len(deltas))]
            tails = [
                ',"usage":' + _ENC({**usage, "completion_tokens": tokens(chars),
                                   "total_tokens": usage["prompt_tokens"] + tokens(chars)}) + "}"
                for chars in sent
            ]
            tail = ',"usage":' + _ENC(usage) + "}"
            include_usage = False
        events = [
            f'{envelope},"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":null}}]{piece_tail}'
            for delta, piece_tail in zip(deltas, tails, strict=True)
        ]
        if kind == "cut":
            events = events[:2]
        elif kind == "stream_error":
            events = events[:2] + [_ENC(self._stream_error(call, fault))]
        else:
            events.append(
                f'{envelope},"choices":[{{"index":0,"delta":{{}},"logprobs":null,'
                f'"finish_reason":"{finish}"}}]{tail}'
            )
            if include_usage:
                events.append(f'{envelope},"choices":[],"usage":{_ENC(usage)}}}')
            events.append("[DONE]")
        # The whole stream is known at once, so it goes out with a Content-Length and
        # the connection stays reusable; clients still parse it event by event.
        sse = "".join(f"data: {event}\n\n" for event in events).encode()
        return Payload(200, sse, SSE_TYPE, {"Cache-Control": "no-cache", **headers})

    def _stream_error(self, call: ChatCall, fault: Fault | None) -> dict[str, Any]:
        status = (fault.status if fault is not None else None) or 429
        message = fault.message if fault is not None and fault.message else None
        if status == 429:
            return error_body(
                message or f"Rate limit reached for {call.model} (simulated by FakeLLMServer).",
                "requests",
                "rate_limit_exceeded",
            )
        if status == 529:
            return error_body(message or "Overloaded (simulated).", "overloaded_error", "overloaded")
        return error_body(
            message or "The server had an error while processing your request (simulated).",
            "server_error",
            "internal_error",
        )

    # -- faults and refusals ------------------------------------------------------------

    def fault(self, call: ChatCall, fault: Fault) -> Payload:
        """The reply for a non-answering fault, in OpenAI's shapes."""
        kind = fault.kind
        headers = fault.retry_headers()
        shared = protocol_free_fault(kind, fault.status, fault.message, headers, call.stream, (
            b'data: {"id": "chatcmpl-fake", "choices": [\n\n',
            b'{"id": "chatcmpl-fake", "object": "chat.completion", "choices": [{"mess',
        ))
        if shared is not None:
            return shared
        if kind == "429":
            return error_payload(
                429,
                fault.message
                or f"Rate limit reached for {call.model} (simulated by FakeLLMServer).",
                "requests",
                "rate_limit_exceeded",
                headers=headers,
            )
        if kind == "context_length":
            return error_payload(
                400,
                fault.message
                or "This model's maximum context length is 8192 tokens; your messages resulted "
                "in more tokens (simulated). Please reduce the length of the messages.",
                "invalid_request_error",
                "context_length_exceeded",
                param="messages",
                headers=headers,
            )
        if kind == "500":
            return error_payload(
                500,
                fault.message
                or "The server had an error while processing your request (simulated).",
                "server_error",
                "internal_error",
                headers=headers,
            )
        if kind == "529":
            return error_payload(
                529, fault.message or "Overloaded (simulated).", "overloaded_error", "overloaded",
                headers=headers,
            )
        return error_payload(
            503,
            fault.message or "The server is overloaded or not ready yet (simulated).",
            "server_error",
            "service_unavailable",
            headers=headers,
        )

    def refusal(self, call: ChatCall, refusal: Refusal) -> Payload:
        """A refusal as an OpenAI error."""
        return error_payload(
            refusal.status, refusal.message, refusal.type, refusal.code, refusal.param
        )


def model_cards(names: list[str]) -> list[dict[str, Any]]:
    """OpenAI's model objects for ``names``."""
    return [
        {"id": name, "object": "model", "created": 0, "owned_by": "rlm-testing"}
        for name in names
    ]


def add_routes(app: web.Application, hub: Hub, models: Callable[[], list[str]]) -> None:
    """Serve chat completions and the model list on ``app`` (with and without ``/v1``)."""
    wire = OpenAIWire(hub.ids.__next__, hub.cache)

    async def chat(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return respond(not_allowed())
        call = parse_chat(await request.read(), models()[0])
        if isinstance(call, Payload):
            return respond(call)
        entry = hub.log_entry(request, call, call.messages)
        return await hub.exchange(request, call, wire, entry)

    async def model_list(request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return respond(not_allowed())
        return respond(json_payload(200, {"object": "list", "data": model_cards(models())}))

    async def one_model(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        cards = [card for card in model_cards(models()) if card["id"] == name]
        if request.method == "GET" and cards:
            return respond(json_payload(200, cards[0]))
        return respond(
            error_payload(
                404, f"The model {name!r} does not exist", code="model_not_found"
            )
        )

    for prefix in ("/v1", ""):
        app.router.add_route("*", f"{prefix}/chat/completions", chat)
        app.router.add_route("*", f"{prefix}/models", model_list)
        app.router.add_route("*", prefix + "/models/{name:.+}", one_model)


def not_allowed() -> Payload:
    """A 405 in OpenAI's error shape."""
    return error_payload(405, "Method not allowed")

