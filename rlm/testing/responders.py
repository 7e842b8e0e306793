"""Responders: the functions that decide what the fake model says.

Holds the responder types, :func:`echo_responder` and the load-shaped wrappers
(:func:`random_faults`, :func:`token_bucket`). A responder sees the request's messages
in OpenAI's shape (``role`` and ``content``; Anthropic requests are normalised to it, the
system prompt as the first message) and returns a string, a JSON value or a
:class:`Fault`. This module must not hold HTTP, protocol rendering or per-model limits:
those are the server's, so the same responder answers every protocol.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from rlm.testing.faults import Fault

__all__ = [
    "JSONResponder",
    "Reply",
    "Responder",
    "ScriptItem",
    "echo_responder",
    "last_user_text",
    "random_faults",
    "text_of",
    "token_bucket",
]

Reply: TypeAlias = "str | Fault"
Responder: TypeAlias = "Callable[[list[dict[str, Any]]], Any]"
# Sees the messages and the request's ``response_format`` (OpenAI's shape, also for an
# Anthropic forced tool call); returns a JSON value (sent as JSON text), a str (sent as
# is) or a Fault.
JSONResponder: TypeAlias = "Callable[[list[dict[str, Any]], dict[str, Any]], Any]"
ScriptItem: TypeAlias = "str | Fault | Callable[[list[dict[str, Any]]], Any]"


def text_of(content: Any) -> str:
    """Text of a message's content, which is a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message, or "" when there is none."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def echo_responder(messages: list[dict[str, Any]]) -> str:
    """The default responder, deterministic: a last user message that starts with ``"ECHO "``
    is answered with the rest of it (``"ECHO 1"`` gives ``"1"``), so tests can check that
    every answer reached the prompt that asked for it; anything else gets
    ``"fake answer to: "`` followed by the first 60 characters of the message.
    """
    text = last_user_text(messages)
    if text.startswith("ECHO "):
        return text[5:]
    return f"fake answer to: {text[:60]}"


def random_faults(
    rate: float,
    *,
    kinds: Sequence[str] = ("429", "503"),
    retry_after: float | None = None,
    retry_after_on: Sequence[str] = ("429", "503"),
    seed: int | None = None,
    inner: Responder = echo_responder,
) -> Responder:
    """A responder that answers a random ``rate`` of requests with a fault of one of
    ``kinds`` (those in ``retry_after_on`` carrying ``Retry-After: retry_after`` when
    given) and the rest with ``inner``. Faults are independent of load, like a flaky
    endpoint; ``seed`` makes the sequence repeatable. ``rate`` is in [0, 1]: at 1 every
    request fails."""
    if not 0 <= rate <= 1:
        raise ValueError("rate must be in [0, 1]")
    rng = random.Random(seed)
    faults = [
        Fault(k, retry_after=retry_after) if k in retry_after_on else Fault(k) for k in kinds
    ]
    if not faults:
        raise ValueError("kinds must name at least one fault kind")
    lock = threading.Lock()

    def respond(messages: list[dict[str, Any]]) -> Any:
        with lock:
            hit = rng.random() < rate
            fault = rng.choice(faults) if hit else None
        return fault if fault is not None else inner(messages)

    return respond


def token_bucket(
    rate: float, *, burst: float | None = None, inner: Responder = echo_responder
) -> Responder:
    """A responder behind a token bucket of ``rate`` requests/s holding at most ``burst``
    tokens (default: one second's worth): a request that finds no token gets a 429 whose
    ``retry-after-ms`` says when the next token comes, like a provider's rate limit. For
    per-model request and token buckets with rate-limit headers, use the server's
    ``limits=`` instead."""
    if rate <= 0:
        raise ValueError("rate must be > 0 requests per second")
    capacity = float(burst if burst is not None else rate)
    state = {"tokens": capacity, "at": time.monotonic()}
    lock = threading.Lock()

    def respond(messages: list[dict[str, Any]]) -> Any:
        with lock:
            now = time.monotonic()
            tokens = min(capacity, state["tokens"] + (now - state["at"]) * rate)
            state["at"] = now
            if tokens < 1:
                state["tokens"] = tokens
                wait_ms = max(1, int((1 - tokens) / rate * 1000))
                return Fault("429", retry_after_ms=wait_ms)
            state["tokens"] = tokens - 1
        return inner(messages)

    return respond
