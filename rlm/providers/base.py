"""The provider seam: what a wire-format adapter does, and the values it speaks in.

An ``Adapter`` turns a ``Request`` into the HTTP request one provider expects (URL,
headers, JSON body; a streaming variant) and turns what comes back into the client's
vocabulary: a ``Reply`` (text, model, tokens), an ``rlm.errors`` error (status, the
server's own message, the wait it asked for), a ``RateLimits`` value from the
rate-limit headers, and ``StreamEvent``s from a streamed reply.

This module must not hold transport, retries, pacing, caching or usage accounting:
those live once, in the client (``rlm.llm``), for every provider. An adapter does no
I/O and keeps no state beyond its endpoint and credentials.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from rlm.errors import LLMError, RateLimitError, ResponseError
from rlm.providers.ratelimits import RateLimits, retry_after_seconds

# At most this much of an error body goes into an error message.
ERROR_SNIPPET = 300


@dataclass(slots=True)
class Request:
    """One chat completion to send: its JSON body (OpenAI chat shape), whatever the provider.

    Package-internal interface (core, repl and the cache use it): the body is also what
    a cache keys on. Built by ``AsyncOpenAIClient.request``.
    """

    body: dict[str, Any]
    # False: neither read from nor written to the sub-query cache, never joined with an
    # identical request in flight (for code that wants a fresh sample).
    cache: bool = True

    @property
    def model(self) -> str:
        """The model the request names."""
        return str(self.body.get("model", ""))

    @property
    def max_tokens(self) -> int | None:
        """The request's completion cap, if it sets one (budgets reserve that much)."""
        value = self.body.get("max_tokens") or self.body.get("max_completion_tokens")
        return value if isinstance(value, int) else None

    def prompt_chars(self) -> int:
        """Characters of message text, for the conservative token estimate of budgets."""
        total = 0
        for message in self.body.get("messages", ()):
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(str(part.get("text", ""))) for part in content
                             if isinstance(part, Mapping))
        return total


@dataclass(frozen=True, slots=True)
class Reply:
    """What one successful call returned: the text, the answering model and its tokens.

    ``prompt_tokens`` include any ``cached_input_tokens`` (read from the provider's
    prompt cache) and ``cache_creation_tokens`` (written to it); ``completion_tokens``
    include ``reasoning_tokens``. ``usage_reported`` is False when the server sent no
    usage at all (the token counts are then zero, not measured).
    """

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: str | None = None
    usage_reported: bool = True


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    """One HTTP POST, ready to send: where, with which headers, and the encoded body."""

    url: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What one server-sent event of a streamed reply said.

    ``text`` is a piece of the answer (may be empty), ``usage`` the (prompt,
    completion) tokens when the event reports them, ``finish_reason`` set on the event
    that ends the answer, ``error`` a failure the server reported inside the stream,
    ``done`` the end-of-stream marker.
    """

    text: str = ""
    model: str | None = None
    usage: tuple[int, int] | None = None
    finish_reason: str | None = None
    error: LLMError | None = None
    done: bool = False


def token_count(value: Any) -> int:
    """A token count from a usage field, 0 when it is missing or not a number."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def body_snippet(raw: bytes, limit: int = ERROR_SNIPPET) -> str:
    """A bounded, printable piece of a response body for an error message."""
    text = raw[: limit * 4].decode("utf-8", "replace").strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_message(data: Any) -> str | None:
    """The human message in a JSON error body of any common shape, or None.

    OpenAI ``{"error": {"message": ...}}``, FastAPI ``{"detail": ...}`` (a string or a
    list of validation errors), ``{"error": "..."}``, ``{"message": ...}``.
    """
    if isinstance(data, list) and data:
        return error_message(data[0])
    if not isinstance(data, Mapping):
        return None
    error = data.get("error")
    if isinstance(error, str) and error:
        return error
    if isinstance(error, Mapping):
        found = error_message(error)
        if found:
            return found
    for key in ("message", "detail", "error_description", "title"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
        if key == "detail" and isinstance(value, list) and value:
            parts = []
            for item in value[:3]:
                if isinstance(item, Mapping):
                    where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                    msg = str(item.get("msg", item))
                    parts.append(f"{where}: {msg}" if where else msg)
                else:
                    parts.append(str(item))
            return "; ".join(parts)
        if isinstance(value, Mapping):
            found = error_message(value)
            if found:
                return found
    return None


class Adapter(abc.ABC):
    """One provider's wire format: build requests, parse replies, errors, limits, streams.

    Subclasses set the class attributes and implement ``build``, ``parse_reply`` and
    ``parse_stream_event``; ``parse_error``, ``parse_limits`` and ``retry_after`` have
    defaults that read the common shapes. An instance is one endpoint with one key.
    """

    #: The provider's name, also its model prefix ("anthropic/claude-...").
    name: ClassVar[str]
    #: Environment variables of the key and of the endpoint, and the default endpoint.
    key_env: ClassVar[str]
    base_url_env: ClassVar[str | None] = None
    default_base_url: ClassVar[str]

    def __init__(self, base_url: str | None, api_key: str) -> None:
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.api_key = api_key

    def wire_model(self, model: str) -> str:
        """The model name this provider is sent for ``model`` (default: as given)."""
        return model

    @abc.abstractmethod
    def build(self, request: Request, *, stream: bool = False) -> HTTPRequest:
        """The HTTP request for ``request`` (``stream``: ask for server-sent events)."""

    @abc.abstractmethod
    def parse_reply(self, data: Any, request: Request) -> Reply:
        """The ``Reply`` in a decoded 200 body; ``ResponseError`` if it is not one."""

    @abc.abstractmethod
    def parse_stream_event(self, event: str, data: str) -> StreamEvent | None:
        """What one server-sent event (its ``event:`` name, its joined ``data:``) says;
        None for events that carry nothing the client uses."""

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> LLMError:
        """The error for a non-200 answer: ``RateLimitError`` for 429, ``LLMError`` else,
        with the status, the server's own message and the wait it asked for."""
        message = None
        try:
            message = error_message(json.loads(raw))
        except ValueError:
            pass
        if not message:
            message = body_snippet(raw) or "(empty body)"
        elif len(message) > ERROR_SNIPPET:
            message = message[: ERROR_SNIPPET - 1] + "…"
        kind = RateLimitError if status == 429 else LLMError
        return kind(message, status=status, retry_after=self.retry_after(headers))

    def parse_limits(self, headers: Mapping[str, str]) -> RateLimits | None:
        """What the rate-limit headers of a reply say (None: the reply has none)."""
        return None

    def retry_after(self, headers: Mapping[str, str]) -> float | None:
        """Seconds the server asked to wait before the next try (None: it did not say)."""
        return retry_after_seconds(headers)

    def stream_error(self, data: Any) -> LLMError | None:
        """An error the server put inside a 200 stream (a JSON event), typed like a status
        error would be: rate limits are ``RateLimitError`` (retried like a 429)."""
        if not isinstance(data, Mapping) or "error" not in data:
            return None
        error = data["error"]
        message = error_message(data) or body_snippet(json.dumps(data).encode())
        fields = error if isinstance(error, Mapping) else {}
        code = " ".join(str(fields.get(k, "")) for k in ("type", "code", "status")).lower()
        raw_status = fields.get("status") if isinstance(fields.get("status"), int) else None
        if "rate_limit" in code or "rate limit" in message.lower() or raw_status == 429:
            return RateLimitError(message, status=429)
        if "overloaded" in code or raw_status in (500, 502, 503, 529):
            return LLMError(message, status=raw_status or 503)
        return LLMError(message, status=raw_status)


def not_a_reply(what: str, data: Any) -> ResponseError:
    """The error for a 200 body that is not the reply it should be."""
    return ResponseError(f"the endpoint's reply is not {what}: {str(data)[:200]}")
