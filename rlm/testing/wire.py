"""What a route hands the HTTP layer, and how it goes out through aiohttp.

Holds :class:`Payload` (status, headers, body and what to do with the connection: send,
drop, hang or cut the body short) and :func:`deliver`, which plays it on an aiohttp
request after the simulated latency. It must not know any provider's shapes: routes
build payloads, this module only sends them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

__all__ = ["Payload", "deliver", "json_payload", "protocol_free_fault", "respond"]

Action = Literal["send", "drop", "hang", "truncate"]

JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream; charset=utf-8"


@dataclass
class Payload:
    """One reply: ``action`` is ``"send"`` (the whole body), ``"drop"`` (close without a
    byte), ``"hang"`` (never answer) or ``"truncate"`` (promise the whole body in
    Content-Length, send half of it, close)."""

    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    action: Action = "send"


def protocol_free_fault(kind: str, status: int | None, message: str | None,
                        headers: dict[str, str], stream: bool,
                        broken: tuple[bytes, bytes]) -> Payload | None:
    """The reply for a fault whose shape owes nothing to a provider (``hang``, ``drop``,
    ``detail``, and ``malformed`` given the protocol's ``broken`` (stream, JSON) bodies),
    or None for a kind the protocol renders itself."""
    if kind == "hang":
        return Payload(action="hang")
    if kind == "drop":
        return Payload(action="drop")
    if kind == "malformed":
        # A streaming client only parses data lines, so a stream breaks one of those.
        return Payload(200, broken[0], SSE_TYPE, headers) if stream else Payload(
            200, broken[1], headers=headers
        )
    if kind == "detail":
        detail = message or "Invalid request (simulated FastAPI error)."
        return json_payload(status or 400, {"detail": detail}, headers)
    return None


def json_payload(status: int, value: Any, headers: dict[str, str] | None = None) -> Payload:
    """A JSON reply, compactly encoded."""
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return Payload(status, body, headers=dict(headers or {}))


async def deliver(
    request: web.Request, payload: Payload, delay: float, stopping: asyncio.Event
) -> web.StreamResponse:
    """Wait ``delay`` seconds, then play ``payload`` on ``request``'s connection. A hang waits
    until the server stops (or the client leaves, which cancels the handler); a drop or a
    hang's end aborts the connection, which the client sees as a disconnect."""
    if payload.action == "hang":
        await stopping.wait()
        return _abort(request)
    if delay > 0:
        await asyncio.sleep(delay)
    if payload.action == "drop":
        return _abort(request)
    if payload.action == "truncate":
        headers = {"Content-Type": payload.content_type, **payload.headers}
        response = web.StreamResponse(status=payload.status, headers=headers)
        response.content_length = len(payload.body)
        await response.prepare(request)
        await response.write(payload.body[: len(payload.body) // 2])
        return _abort(request)
    return respond(payload)


def respond(payload: Payload) -> web.Response:
    """``payload`` as an aiohttp response, to send at once (a plain send only)."""
    return web.Response(
        status=payload.status,
        body=payload.body,
        headers={"Content-Type": payload.content_type, **payload.headers},
    )


def _abort(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.abort()
    # The connection is gone; aiohttp discards whatever the handler returns now.
    raise asyncio.CancelledError
