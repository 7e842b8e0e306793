"""The fast path: OpenAI chat completions on a hand-written HTTP/1.1 protocol.

Holds :class:`FastConnection`, the protocol every accepted connection starts with. It
parses pipelined requests itself and answers ``POST /v1/chat/completions`` (the one
route benchmarks drive with 10,000 concurrent requests) through the shared pipeline,
with the simulated latency as a timer, in request order. At the first request it does
not serve, it hands the connection, with the bytes of that request, to aiohttp's
protocol, which serves every other route from then on. It exists because aiohttp.web
cost about 3.7x the server CPU per chat request here (300 against 80 microseconds), CPU
that a benchmark's client on the same 2 cores pays for. It must not hold any route but
chat completions, nor render payloads beyond the HTTP framing.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from rlm.testing.hub import Hub
from rlm.testing.openai_api import OpenAIWire, chat_call, error_payload
from rlm.testing.wire import Payload

__all__ = ["FAST_PATHS", "FastConnection", "http_bytes"]

FAST_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
# Limits that keep a misbehaving client from making the server buffer without bound.
_MAX_HEAD = 64 * 1024
_MAX_BODY = 256 * 1024 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    529: "Site Overloaded",
}

_Head = tuple[str, str, str, bool, dict[str, str], int]


def http_bytes(payload: Payload, close: bool) -> bytes:
    """``payload`` as one HTTP/1.1 response, so each answer leaves in a single send()."""
    head = (
        f"HTTP/1.1 {payload.status} {_REASONS.get(payload.status, 'Status')}\r\n"
        f"Content-Type: {payload.content_type}\r\n"
        f"Content-Length: {len(payload.body)}\r\n"
    )
    for name, value in payload.headers.items():
        head += f"{name}: {value}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + payload.body


class FastConnection(asyncio.Protocol):
    """One client connection on the fast path, until it asks for another route."""

    def __init__(
        self,
        hub: Hub,
        wire: OpenAIWire,
        default_model: Callable[[], str],
        handoff: Callable[[], asyncio.Protocol],
        opened: set[FastConnection],
    ) -> None:
        self._hub = hub
        self._wire = wire
        self._default_model = default_model
        self._handoff = handoff
        self._opened = opened
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # The parsed head of a request whose body has not fully arrived yet, kept so a
        # large body does not make us rescan the buffer for the end of the head.
        self._head: _Head | None = None
        # True while a request waits out its latency (or hangs); later pipelined
        # requests wait in the buffer so answers go out in request order.
        self._busy = False
        self._closing = False
        self._handed_over = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._opened.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy:
            # A request in flight (waiting or hung) ends with its connection.
            self._busy = False
            self._hub.end()
        self._closing = True
        self._opened.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if not self._busy:
            self._process()

    def abort(self) -> None:
        """Close at once, dropping anything unsent; used when the server stops."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, status: int, message: str) -> None:
        # Errors in the framing leave the byte stream unsynchronised: answer and close.
        assert self._transport is not None
        self._transport.write(http_bytes(error_payload(status, message), close=True))
        self._close()

    def _hand_over(self, head: bytes) -> None:
        # aiohttp takes the connection from this request on: its bytes, then the rest.
        transport = self._transport
        assert transport is not None
        protocol = self._handoff()
        self._handed_over = self._closing = True
        self._opened.discard(self)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head + bytes(self._buffer))
        self._buffer.clear()

    def _process(self) -> None:
        buffer = self._buffer
        while not self._busy and not self._closing:
            if self._head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        self._fail(431, "request head too large")
                    return
                raw = bytes(buffer[: end + 4])
                head = self._parse_head(raw[:-4])
                del buffer[: end + 4]
                if head is None:
                    return
                if head[0] != "POST" or head[1] not in FAST_PATHS:
                    self._hand_over(raw)
                    return
                self._head = head
                if head[5] > len(buffer) and head[4].get("expect", "").lower() == "100-continue":
                    assert self._transport is not None
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            method, path, query, keep_alive, headers, length = self._head
            if length >= 0:
                if len(buffer) < length:
                    return
                body = bytes(buffer[:length])
                del buffer[:length]
            else:
                taken = self._take_chunked()
                if taken is None:
                    return
                body = taken
            self._head = None
            self._chat(path, query, keep_alive, headers, body)

    def _parse_head(self, raw: bytes) -> _Head | None:
        # One decode for the whole head: per-line decodes were the costliest part of a
        # request here. Empty lines before the request line are tolerated (RFC 9112, 2.2).
        lines = raw.decode("latin-1").lstrip("\r\n").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._fail(400, "malformed request line")
            return None
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self._fail(400, "malformed header line")
                return None
            key = name.lower()
            text = value.strip()
            if key in headers and key == "content-length" and headers[key] != text:
                self._fail(400, "conflicting Content-Length headers")
                return None
            headers[key] = text
        # HTTP/1.0 clients get one request per connection: simpler than echoing their
        # keep-alive opt-in, and still correct since a server may always close.
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = version != "HTTP/1.0" and "close" not in tokens
        if "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower() != "chunked":
                self._fail(501, "only the chunked transfer coding is supported")
                return None
            length = -1
        else:
            raw_length = headers.get("content-length", "0")
            if not raw_length.isdigit():
                self._fail(400, "invalid Content-Length")
                return None
            length = int(raw_length)
            if length > _MAX_BODY:
                self._fail(413, "request body too large")
                return None
        if target.startswith(("http://", "https://")):
            split = urllib.parse.urlsplit(target)
            target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        path, _, query = target.partition("?")
        return method, path, query, keep_alive, headers, length

    def _take_chunked(self) -> bytes | None:
        """The whole chunked body if it has arrived (consumed from the buffer), else None."""
        buffer = self._buffer
        pos = 0
        pieces: list[bytes] = []
        total = 0
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                return None
            size_text = bytes(buffer[pos:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self._fail(400, "invalid chunk size")
                return None
            pos = eol + 2
            if size == 0:
                # Skip trailer fields up to the empty line that ends the body.
                end = buffer.find(b"\r\n", pos)
                while end > pos:
                    pos = end + 2
                    end = buffer.find(b"\r\n", pos)
                if end < 0:
                    return None
                del buffer[: end + 2]
                return b"".join(pieces)
            if len(buffer) < pos + size + 2:
                return None
            pieces.append(bytes(buffer[pos : pos + size]))
            pos += size + 2
            total += size
            if total > _MAX_BODY:
                self._fail(413, "request body too large")
                return None

    def _chat(
        self, path: str, query: str, keep_alive: bool, headers: dict[str, str], body: bytes
    ) -> None:
        close = not keep_alive
        try:
            request: Any = json.loads(body)
        except ValueError as exc:
            message = f"We could not parse the JSON body of your request: {exc}"
            self._send(error_payload(400, message), close)
            return
        call = chat_call(request, self._default_model())
        if isinstance(call, Payload):
            self._send(call, close)
            return
        params = dict(urllib.parse.parse_qsl(query)) if query else {}
        entry = self._hub.entry(call, call.messages, path, params, headers)
        payload, delay = self._hub.prepare(call, self._wire, entry)
        self._busy = True
        if payload.action == "hang":
            return
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(
                delay, self._answer_later, payload, close
            )
        else:
            # Called from inside _process, whose loop goes on with pipelined requests.
            self._complete(payload, close)

    def _send(self, payload: Payload, close: bool) -> None:
        if self._closing or self._transport is None:
            return
        self._transport.write(http_bytes(payload, close))
        if close:
            self._close()

    def _answer_later(self, payload: Payload, close: bool) -> None:
        self._timer = None
        self._complete(payload, close)
        if self._buffer:
            self._process()

    def _complete(self, payload: Payload, close: bool) -> None:
        self._busy = False
        self._hub.end()
        if payload.action == "drop":
            self._close()
        elif payload.action == "truncate":
            whole = http_bytes(payload, close=True)
            if self._transport is not None and not self._closing:
                self._transport.write(whole[: len(whole) - len(payload.body) // 2])
            self._close()
        else:
            self._send(payload, close)
