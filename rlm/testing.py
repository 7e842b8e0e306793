"""FakeLLMServer: a real OpenAI-compatible HTTP server on loopback, for offline tests.

It is the only stand-in in the project: everything talks to it over real sockets, the
way it would talk to a remote model. It answers ``POST /v1/chat/completions`` (JSON, or
SSE when ``"stream": true``) and ``GET /v1/models``, simulates latency, injects faults
(429, 500, 503, a hang, a dropped connection, malformed JSON) and counts requests,
in-flight requests and their peak so tests and benchmarks can prove concurrency. It
also answers structured requests (``response_format``) through a ``json_responder``,
or refuses them with a 400 like a server without JSON-schema support.

It is a plain ``asyncio.Protocol`` HTTP/1.1 server rather than a web framework because
benchmarks drive it with 10,000 concurrent connections from a 2-core machine: the
server's CPU per request has to stay small enough that the numbers measure the client.

Use it in-process (``with FakeLLMServer() as server:`` serves on a background thread,
``async with`` on the caller's loop) or as its own process
(``python -m rlm.testing --port 0 --latency 0.5``, or :func:`spawn_fake_server`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import http.client
import itertools
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

__all__ = [
    "FAULT_KINDS",
    "FakeLLMServer",
    "Fault",
    "JSONResponder",
    "Reply",
    "Responder",
    "echo_responder",
    "random_faults",
    "token_bucket",
    "fetch_stats",
    "main",
    "reset_stats",
    "spawn_fake_server",
]

FAULT_KINDS = frozenset({"429", "500", "503", "hang", "drop", "malformed", "context_length"})

# Limits that keep a misbehaving client from making the server buffer without bound.
_MAX_HEAD = 64 * 1024
_MAX_BODY = 256 * 1024 * 1024
_LOG_SIZE = 1000
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Fault:
    """A failure the server plays instead of a normal answer: return one from a responder or a
    script item, or queue one with :meth:`FakeLLMServer.inject`. ``kind`` is ``"429"`` (with
    ``Retry-After`` in seconds and/or ``retry-after-ms`` headers when given), ``"500"`` or
    ``"503"`` (an OpenAI-style error body), ``"hang"`` (never answer; the connection stays
    open until the client gives up or the server stops), ``"drop"`` (close the connection
    without a byte), ``"malformed"`` (status 200 whose body is not valid JSON) or
    ``"context_length"`` (400 ``context_length_exceeded``, as a model refuses a prompt
    longer than its window).
    """

    kind: str
    _: KW_ONLY
    retry_after: float | None = None
    retry_after_ms: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; use one of {', '.join(sorted(FAULT_KINDS))}"
            )
        if self.kind not in ("429", "503") and (
            self.retry_after is not None or self.retry_after_ms is not None
        ):
            raise ValueError("retry_after and retry_after_ms only apply to Fault('429'/'503')")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0 seconds")
        if self.retry_after_ms is not None and self.retry_after_ms < 0:
            raise ValueError("retry_after_ms must be >= 0")


Reply: TypeAlias = "str | Fault"
Responder: TypeAlias = "Callable[[list[dict[str, Any]]], str | Fault]"
# Sees the messages and the request's ``response_format``; returns a JSON value (sent as
# JSON text), a str (sent as is) or a Fault.
JSONResponder: TypeAlias = "Callable[[list[dict[str, Any]], dict[str, Any]], Any]"
ScriptItem: TypeAlias = "str | Fault | Callable[[list[dict[str, Any]]], str | Fault]"


def _text_of(content: Any) -> str:
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


def echo_responder(messages: list[dict[str, Any]]) -> str:
    """The default responder, deterministic: a last user message that starts with ``"ECHO "``
    is answered with the rest of it (``"ECHO 1"`` gives ``"1"``), so tests can check that
    every answer reached the prompt that asked for it; anything else gets
    ``"fake answer to: "`` followed by the first 60 characters of the message.
    """
    text = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _text_of(message.get("content"))
            break
    if text.startswith("ECHO "):
        return text[5:]
    return f"fake answer to: {text[:60]}"


def _tokens(text_length: int) -> int:
    # Cheap and deterministic on purpose: tests assert exact usage totals.
    return max(1, text_length // 4)


def _error_body(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    extra: str = "",
    close: bool = False,
) -> bytes:
    # One bytes object per response so each answer leaves in a single send().
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
    )
    if close:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + body


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# What the connection does once the simulated latency has passed.
_Action: TypeAlias = Literal["send", "drop", "hang"]


class _Connection(asyncio.Protocol):
    """One client connection: parses pipelined HTTP/1.1 requests and answers them in order."""

    __slots__ = ("_buffer", "_busy", "_closing", "_head", "_server", "_timer", "_transport")

    def __init__(self, server: FakeLLMServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # The parsed head of a request whose body has not fully arrived yet, kept so a
        # large body does not make us rescan the buffer for the end of the head.
        self._head: tuple[str, str, bool, dict[str, str], int] | None = None
        # True while a request waits out its latency (or hangs); later pipelined
        # requests wait in the buffer so answers go out in request order.
        self._busy = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy:
            # A request in flight (waiting or hung) ends with its connection.
            self._busy = False
            self._server._chat_finished()
        self._closing = True
        self._server._connection_closed(self)

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
        self._transport.write(
            _response(status, _error_body(message, "invalid_request_error", None), close=True)
        )
        self._close()

    def _process(self) -> None:
        buffer = self._buffer
        while not self._busy and not self._closing:
            if self._head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        self._fail(431, "request head too large")
                    return
                head = self._parse_head(bytes(buffer[:end]))
                del buffer[: end + 4]
                if head is None:
                    return
                self._head = head
                headers = head[3]
                if head[4] > len(buffer) and headers.get("expect", "").lower() == "100-continue":
                    assert self._transport is not None
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            method, path, keep_alive, headers, length = self._head
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
            self._server._dispatch(self, method, path, keep_alive, headers, body)

    def _parse_head(self, raw: bytes) -> tuple[str, str, bool, dict[str, str], int] | None:
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
            target = urllib.parse.urlsplit(target).path or "/"
        path = target.split("?", 1)[0]
        return method, path, keep_alive, headers, length

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

    def send(self, payload: bytes, keep_alive: bool) -> None:
        """Write a complete response and close the connection unless it is kept alive."""
        if self._closing or self._transport is None:
            return
        self._transport.write(payload)
        if not keep_alive:
            self._close()

    def answer(self, delay: float, action: _Action, payload: bytes, keep_alive: bool) -> None:
        """Answer a chat request now, after ``delay`` seconds, or never (a hang)."""
        self._busy = True
        if action == "hang":
            return
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(
                delay, self._answer_later, action, payload, keep_alive
            )
        else:
            # Called from inside _process, whose loop goes on with pipelined requests.
            self._complete(action, payload, keep_alive)

    def _answer_later(self, action: _Action, payload: bytes, keep_alive: bool) -> None:
        self._timer = None
        self._complete(action, payload, keep_alive)
        if self._buffer:
            self._process()

    def _complete(self, action: _Action, payload: bytes, keep_alive: bool) -> None:
        self._busy = False
        self._server._chat_finished()
        if action == "drop":
            self._close()
        else:
            self.send(payload, keep_alive)


class FakeLLMServer:
    """An OpenAI-compatible chat server on a real loopback socket, for offline tests.

    Requests whose ``model`` is a key of ``scripts`` are answered from that list, indexed
    by how many assistant messages the request already carries (past the end: the last
    item), so scripted conversations are stateless and many can share one script;
    every other request goes to ``responder`` (default :func:`echo_responder`). Items
    and responders give a string or a :class:`Fault`; a dict, list or number is sent as
    its JSON text. A request with a ``response_format`` goes to
    ``json_responder(messages, response_format)`` when one is given (the JSON Schema is
    ``response_format["json_schema"]["schema"]``); with ``response_format=False`` the
    server refuses such requests with a 400 naming ``response_format``, as servers
    without structured output do. ``latency`` is fixed seconds or a
    ``(lo, hi)`` range drawn uniformly per request, waited with a timer so N
    concurrent requests take about one latency in all. ``start()``/``with`` serve on a
    background thread (responders then run on that thread); ``astart()``/``async with``
    serve on the caller's running loop. ``url`` is the base URL for the OpenAI SDK.
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        scripts: Mapping[str, Sequence[ScriptItem]] | None = None,
        latency: float | tuple[float, float] = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "fake-model",
        json_responder: JSONResponder | None = None,
        response_format: bool = True,
    ) -> None:
        self.responder: Responder = responder if responder is not None else echo_responder
        self.json_responder = json_responder
        self.response_format = response_format
        self._scripts: dict[str, tuple[ScriptItem, ...]] = {}
        for name, items in (scripts or {}).items():
            if isinstance(items, str) or not items:
                raise ValueError(f"script for model {name!r} must be a non-empty list of turns")
            self._scripts[name] = tuple(items)
        self.latency = latency
        self.host = host
        self.model = model
        self._requested_port = port
        self._bound_port: int | None = None

        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=_LOG_SIZE)
        self._ids = itertools.count(1)
        self._requests = 0
        self._in_flight = 0
        self._peak_in_flight = 0
        self._streams = 0
        self._faults_served = 0
        self._connections = 0
        self._open: set[_Connection] = set()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._all_closed: asyncio.Future[None] | None = None

    # -- configuration -------------------------------------------------------------

    @property
    def latency(self) -> float | tuple[float, float]:
        """Simulated seconds per chat request: fixed, or a ``(lo, hi)`` uniform range."""
        return self._latency

    @latency.setter
    def latency(self, value: float | tuple[float, float]) -> None:
        if isinstance(value, tuple):
            lo, hi = float(value[0]), float(value[1])
        else:
            lo = hi = float(value)
        if lo < 0 or hi < lo:
            raise ValueError(
                f"latency must be >= 0 seconds, or (lo, hi) with 0 <= lo <= hi; got {value!r}"
            )
        # Stored as two floats so the hot path does no type checks.
        self._latency = value
        self._lat_lo = lo
        self._lat_hi = hi

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def url(self) -> str:
        """Base URL for the OpenAI SDK, ``http://127.0.0.1:PORT/v1``; valid after start."""
        if self._bound_port is None:
            raise RuntimeError(
                "FakeLLMServer is not serving yet: call start() or await astart() first"
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port}/v1"

    # -- counters ------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Chat requests received since the last reset."""
        return self._requests

    @property
    def in_flight(self) -> int:
        """Chat requests received and not yet answered (hung ones included)."""
        return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most chat requests in flight at once since the last reset."""
        return self._peak_in_flight

    @property
    def streams(self) -> int:
        """Chat requests that asked for ``"stream": true`` since the last reset."""
        return self._streams

    @property
    def faults_served(self) -> int:
        """Faults played (injected or returned by a responder) since the last reset."""
        return self._faults_served

    @property
    def connections(self) -> int:
        """TCP connections accepted since the last reset (shows connection-pool reuse)."""
        return self._connections

    @property
    def open_connections(self) -> int:
        """TCP connections open right now."""
        return len(self._open)

    @property
    def requests_log(self) -> list[dict[str, Any]]:
        """The last 1000 chat requests, oldest first, as a copy: each entry has ``model``,
        ``messages``, ``params`` (every other body field) and ``has_authorization``
        (whether an Authorization header was sent)."""
        with self._lock:
            return list(self._log)

    def stats(self) -> dict[str, int]:
        """All counters as a dict, read together under one lock."""
        with self._lock:
            return {
                "requests": self._requests,
                "in_flight": self._in_flight,
                "peak_in_flight": self._peak_in_flight,
                "streams": self._streams,
                "faults_served": self._faults_served,
                "connections": self._connections,
                "open_connections": len(self._open),
            }

    def reset_counters(self) -> None:
        """Zero the counters and clear ``requests_log``; ``in_flight`` is a gauge of
        requests still open, so it is kept and the peak restarts from it, and queued
        faults are not touched."""
        with self._lock:
            self._requests = 0
            self._peak_in_flight = self._in_flight
            self._streams = 0
            self._faults_served = 0
            self._connections = 0
            self._log.clear()

    def inject(
        self,
        kind: str,
        count: int = 1,
        *,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        """Queue a fault for the next ``count`` chat requests, played before any responder
        runs, first in first out; safe to call from any thread while the server runs."""
        if count < 0:
            raise ValueError("count must be >= 0")
        fault = Fault(kind, retry_after=retry_after, retry_after_ms=retry_after_ms)
        with self._lock:
            self._faults.extend([fault] * count)

    # -- lifecycle: the caller's loop ------------------------------------------------

    async def astart(self) -> FakeLLMServer:
        """Start serving on the running event loop and return self once listening."""
        if self._server is not None:
            raise RuntimeError("FakeLLMServer is already serving")
        loop = asyncio.get_running_loop()
        # A deep backlog so a burst of thousands of connects is not refused.
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self._requested_port, backlog=65535
        )
        self._loop = loop
        self._bound_port = self._server.sockets[0].getsockname()[1]
        return self

    async def astop(self) -> None:
        """Stop serving and close every connection, hung ones too; idempotent."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        if self._open:
            self._all_closed = asyncio.get_running_loop().create_future()
            for conn in list(self._open):
                conn.abort()
            # abort() reports connection_lost on the next loop turn; wait for all of
            # them so no socket outlives stop() (that would warn as a ResourceWarning).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed, timeout=5)
            self._all_closed = None
        await server.wait_closed()
        self._loop = None
        self._bound_port = None

    async def __aenter__(self) -> FakeLLMServer:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()

    # -- lifecycle: a background thread ---------------------------------------------

    def start(self) -> FakeLLMServer:
        """Serve on a background thread with its own event loop; return self once listening."""
        if self._server is not None or self._thread is not None:
            raise RuntimeError("FakeLLMServer is already serving")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="FakeLLMServer", daemon=True
        )
        thread.start()
        try:
            ready.result()
        except BaseException:
            thread.join()
            raise
        self._thread = thread
        return self

    def stop(self) -> None:
        """Stop the background server and close every connection; idempotent."""
        thread = self._thread
        if thread is None:
            if self._server is not None:
                raise RuntimeError(
                    "this server was started with astart(); stop it with await astop()"
                )
            return
        if threading.current_thread() is thread:
            raise RuntimeError(
                "stop() called from the server's own thread (a responder) would deadlock"
            )
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve_until_stopped(ready))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve_until_stopped(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            await self.astart()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        self._stop_event = asyncio.Event()
        ready.set_result(None)
        await self._stop_event.wait()
        self._stop_event = None
        await self.astop()

    # -- the request path (runs on the server's loop) -------------------------------

    def _connection_opened(self, conn: _Connection) -> None:
        if self._server is None:
            # Accepted just before astop() closed the listener: it would outlive stop().
            conn.abort()
            return
        with self._lock:
            self._open.add(conn)
            self._connections += 1

    def _connection_closed(self, conn: _Connection) -> None:
        with self._lock:
            self._open.discard(conn)
            empty = not self._open
        if empty and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)

    def _chat_finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _dispatch(
        self,
        conn: _Connection,
        method: str,
        path: str,
        keep_alive: bool,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        close = not keep_alive
        if path in _CHAT_PATHS:
            if method != "POST":
                conn.send(self._not_allowed(close), keep_alive)
                return
            self._chat(conn, keep_alive, headers, body)
            return
        if path in ("/v1/models", "/models"):
            if method != "GET":
                conn.send(self._not_allowed(close), keep_alive)
                return
            payload = json.dumps({"object": "list", "data": self._model_cards()}).encode()
            conn.send(_response(200, payload, close=close), keep_alive)
            return
        if path.startswith(("/v1/models/", "/models/")):
            name = urllib.parse.unquote(path.split("/models/", 1)[1])
            cards = [card for card in self._model_cards() if card["id"] == name]
            if method == "GET" and cards:
                conn.send(_response(200, json.dumps(cards[0]).encode(), close=close), keep_alive)
            else:
                message = f"The model {name!r} does not exist"
                body404 = _error_body(message, "invalid_request_error", "model_not_found")
                conn.send(_response(404, body404, close=close), keep_alive)
            return
        if path in ("/stats", "/v1/stats"):
            if method == "GET":
                conn.send(
                    _response(200, json.dumps(self.stats()).encode(), close=close), keep_alive
                )
            else:
                conn.send(self._not_allowed(close), keep_alive)
            return
        if path in ("/stats/reset", "/v1/stats/reset"):
            if method == "POST":
                self.reset_counters()
                conn.send(
                    _response(200, json.dumps(self.stats()).encode(), close=close), keep_alive
                )
            else:
                conn.send(self._not_allowed(close), keep_alive)
            return
        body404 = _error_body(f"Unknown path {path!r}", "invalid_request_error", "unknown_url")
        conn.send(_response(404, body404, close=close), keep_alive)

    def _not_allowed(self, close: bool) -> bytes:
        return _response(
            405, _error_body("Method not allowed", "invalid_request_error", None), close=close
        )

    def _model_cards(self) -> list[dict[str, Any]]:
        names = dict.fromkeys([self.model, *self._scripts])
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "rlm-testing"}
            for name in names
        ]

    def _chat(
        self, conn: _Connection, keep_alive: bool, headers: dict[str, str], body: bytes
    ) -> None:
        close = not keep_alive
        try:
            request = json.loads(body)
        except ValueError as exc:
            message = f"We could not parse the JSON body of your request: {exc}"
            conn.send(
                _response(400, _error_body(message, "invalid_request_error", None), close=close),
                keep_alive,
            )
            return
        messages = request.get("messages") if isinstance(request, dict) else None
        model = request.get("model", self.model) if isinstance(request, dict) else None
        if not isinstance(messages, list) or not isinstance(model, str):
            message = (
                "The body must be a JSON object with 'model' (a string) and 'messages' (a list)"
            )
            conn.send(
                _response(400, _error_body(message, "invalid_request_error", None), close=close),
                keep_alive,
            )
            return
        stream = request.get("stream") is True
        params = {k: v for k, v in request.items() if k != "model" and k != "messages"}
        entry = {
            "model": model,
            "messages": messages,
            "params": params,
            "has_authorization": "authorization" in headers,
        }
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            if self._in_flight > self._peak_in_flight:
                self._peak_in_flight = self._in_flight
            if stream:
                self._streams += 1
            self._log.append(entry)
            fault = self._faults.popleft() if self._faults else None

        reply: object = fault
        response_format = request.get("response_format")
        if reply is None and response_format is not None and not self.response_format:
            kind = response_format.get("type") if isinstance(response_format, dict) else None
            message = (
                f"Invalid parameter: 'response_format' of type {kind!r} is not supported "
                "with this model (simulated by FakeLLMServer)."
            )
            error = json.dumps(
                {"error": {"message": message, "type": "invalid_request_error",
                           "param": "response_format", "code": None}}
            ).encode()
            self._schedule(conn, "send", _response(400, error, close=close), keep_alive)
            return
        if reply is None:
            try:
                reply = self._answer(model, messages, response_format)
            except Exception as exc:
                # A broken responder is a bug in the test: make the client see it.
                reply = exc
            if isinstance(reply, (dict, list, int, float)):
                reply = json.dumps(reply, ensure_ascii=False)
        action: _Action = "send"
        if isinstance(reply, Fault):
            with self._lock:
                self._faults_served += 1
            action, payload = self._fault_response(reply, stream, close)
        elif isinstance(reply, str):
            payload = self._completion(model, messages, reply, request, stream, close)
        else:
            if isinstance(reply, Exception):
                message = f"responder raised {type(reply).__name__}: {reply}"
            else:
                message = (
                    f"responder returned {type(reply).__name__}; it must return str, Fault or "
                    "a JSON value"
                )
            payload = _response(
                500, _error_body(message, "server_error", "responder_error"), close=close
            )
        self._schedule(conn, action, payload, keep_alive)

    def _schedule(
        self, conn: _Connection, action: _Action, payload: bytes, keep_alive: bool
    ) -> None:
        lo, hi = self._lat_lo, self._lat_hi
        delay = lo if lo == hi else random.uniform(lo, hi)
        conn.answer(delay, action, payload, keep_alive)

    def _answer(self, model: str, messages: list[dict[str, Any]], response_format: Any) -> Any:
        script = self._scripts.get(model)
        if script is None:
            if isinstance(response_format, dict) and self.json_responder is not None:
                return self.json_responder(messages, response_format)
            return self.responder(messages)
        turn = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        item = script[min(turn, len(script) - 1)]
        return item(messages) if callable(item) else item

    def _fault_response(self, fault: Fault, stream: bool, close: bool) -> tuple[_Action, bytes]:
        kind = fault.kind
        if kind == "hang":
            return "hang", b""
        if kind == "drop":
            return "drop", b""
        if kind == "malformed":
            if stream:
                # A streaming client only parses data lines, so break one of those.
                bad = b'data: {"id": "chatcmpl-fake", "choices": [\n\n'
                return "send", _response(200, bad, content_type="text/event-stream", close=close)
            bad = b'{"id": "chatcmpl-fake", "object": "chat.completion", "choices": [{"mess'
            return "send", _response(200, bad, close=close)
        extra = ""
        if fault.retry_after is not None:
            extra += f"Retry-After: {_format_seconds(fault.retry_after)}\r\n"
        if fault.retry_after_ms is not None:
            extra += f"retry-after-ms: {fault.retry_after_ms}\r\n"
        if kind == "429":
            body = _error_body(
                "Rate limit reached for fake-model (simulated by FakeLLMServer).",
                "requests",
                "rate_limit_exceeded",
            )
            return "send", _response(429, body, extra=extra, close=close)
        if kind == "context_length":
            body = _error_body(
                "This model's maximum context length is 8192 tokens; your messages resulted "
                "in more tokens (simulated). Please reduce the length of the messages.",
                "invalid_request_error",
                "context_length_exceeded",
            )
            return "send", _response(400, body, close=close)
        if kind == "500":
            body = _error_body(
                "The server had an error while processing your request (simulated).",
                "server_error",
                "internal_error",
            )
            return "send", _response(500, body, close=close)
        body = _error_body(
            "The server is overloaded or not ready yet (simulated).",
            "server_error",
            "service_unavailable",
        )
        return "send", _response(503, body, extra=extra, close=close)

    def _completion(
        self,
        model: str,
        messages: list[dict[str, Any]],
        text: str,
        request: dict[str, Any],
        stream: bool,
        close: bool,
    ) -> bytes:
        prompt_chars = sum(len(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))
        prompt_tokens = _tokens(prompt_chars)
        completion_tokens = _tokens(len(text))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        ident = f"chatcmpl-fake{next(self._ids)}"
        created = int(time.time())
        if not stream:
            body = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            return _response(200, json.dumps(body, separators=(",", ":")).encode(), close=close)

        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        # Every chunk shares its envelope, so it is encoded once and only the small
        # deltas are encoded per chunk: this keeps a stream nearly as cheap as a reply.
        envelope = json.dumps(
            {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model},
            separators=(",", ":"),
        )[:-1]
        tail = ',"usage":null}' if include_usage else "}"
        # A handful of pieces is enough to exercise a client's reassembly.
        size = max(1, -(-len(text) // 4))
        deltas = ['{"role":"assistant","content":""}']
        deltas += [
            f'{{"content":{json.dumps(text[i : i + size])}}}' for i in range(0, len(text), size)
        ]
        events = [
            f'{envelope},"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":null}}]{tail}'
            for delta in deltas
        ]
        events.append(
            f'{envelope},"choices":[{{"index":0,"delta":{{}},"logprobs":null,'
            f'"finish_reason":"stop"}}]{tail}'
        )
        if include_usage:
            events.append(
                f'{envelope},"choices":[],"usage":{json.dumps(usage, separators=(",", ":"))}}}'
            )
        events.append("[DONE]")
        # The whole stream is known at once, so it goes out with a Content-Length and
        # the connection stays reusable; clients still parse it event by event.
        sse = "".join(f"data: {event}\n\n" for event in events).encode()
        return _response(
            200,
            sse,
            content_type="text/event-stream; charset=utf-8",
            extra="Cache-Control: no-cache\r\n",
            close=close,
        )


# -- load-shaped responders: random faults and a token bucket ----------------------


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
    endpoint; ``seed`` makes the sequence repeatable."""
    if not 0 <= rate < 1:
        raise ValueError("rate must be in [0, 1)")
    rng = random.Random(seed)
    faults = [
        Fault(k, retry_after=retry_after) if k in retry_after_on else Fault(k) for k in kinds
    ]
    lock = threading.Lock()

    def respond(messages: list[dict[str, Any]]) -> str | Fault:
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
    Retry-After says when the next token comes, like a provider's rate limit."""
    if rate <= 0:
        raise ValueError("rate must be > 0 requests per second")
    capacity = float(burst if burst is not None else rate)
    state = {"tokens": capacity, "at": time.monotonic()}
    lock = threading.Lock()

    def respond(messages: list[dict[str, Any]]) -> str | Fault:
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


# -- subprocess mode ---------------------------------------------------------------


def _raise_fd_limit() -> None:
    try:
        import resource
    except ImportError:  # not on this platform: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _serve_forever(server: FakeLLMServer) -> None:
    await server.astart()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    print(f"READY {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.astop()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the echo responder until SIGTERM or SIGINT (``python -m rlm.testing``), printing
    exactly one line, ``READY http://HOST:PORT/v1``, once listening (``--port 0`` picks a
    free port), so a parent process can wait for it. The open-file soft limit is raised to
    the hard limit first, since 10,000 concurrent connections need it.
    """
    parser = argparse.ArgumentParser(
        prog="python -m rlm.testing", description="Serve a fake OpenAI-compatible model."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument(
        "--latency-max", type=float, default=None, help="draw latency uniformly up to this"
    )
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="answer this random share of requests with a 429 or 503")
    parser.add_argument("--retry-after", type=float, default=None,
                        help="Retry-After seconds on those faults")
    parser.add_argument("--retry-after-on", default="429,503",
                        help="which fault kinds carry Retry-After (comma-separated)")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="a token bucket of this many requests/s (429 beyond it)")
    parser.add_argument("--burst", type=float, default=None, help="the bucket's size")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    latency: float | tuple[float, float] = args.latency
    if args.latency_max is not None:
        latency = (args.latency, args.latency_max)
    _raise_fd_limit()
    # Importing the package pulls in the openai SDK and pydantic: many long-lived
    # objects that every full collection would rescan while serving. Freezing them cut
    # the server's CPU per request by about a quarter here.
    gc.collect()
    gc.freeze()
    responder: Responder = echo_responder
    if args.fault_rate:
        responder = random_faults(
            args.fault_rate,
            retry_after=args.retry_after,
            retry_after_on=tuple(args.retry_after_on.split(",")),
            seed=args.seed,
        )
    if args.rate_limit:
        responder = token_bucket(args.rate_limit, burst=args.burst, inner=responder)
    server = FakeLLMServer(
        responder, latency=latency, host=args.host, port=args.port, model=args.model
    )
    asyncio.run(_serve_forever(server))
    return 0


@contextlib.contextmanager
def spawn_fake_server(
    latency: float | tuple[float, float] = 0.0,
    *,
    port: int = 0,
    startup_timeout: float = 30.0,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run the echo server in its own process and yield its base URL; benchmarks use it so the
    server's CPU does not compete with the client's inside one interpreter. ``extra_args``
    pass on to ``python -m rlm.testing`` (``--fault-rate``, ``--rate-limit``...). The process
    is terminated (then killed if it lingers) on exit; if it fails to start, the error
    carries its stderr.
    """
    cmd = [sys.executable, "-m", "rlm.testing", "--port", str(port), *extra_args]
    if isinstance(latency, tuple):
        cmd += ["--latency", repr(float(latency[0])), "--latency-max", repr(float(latency[1]))]
    else:
        cmd += ["--latency", repr(float(latency))]
    env = dict(os.environ)
    # Make `rlm` importable in the child even when it is not installed.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=env)
        assert proc.stdout is not None
        try:
            line = _read_line(proc, startup_timeout)
            if not line.startswith("READY "):
                errors.seek(0)
                detail = errors.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"fake server failed to start ({line!r}):\n{detail}")
            yield line.split(" ", 1)[1]
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The child's first stdout line, or "" if it exits or stays silent past ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline().decode(errors="replace").strip()


def _stats_request(base_url: str, method: str, path: str) -> dict[str, int]:
    parts = urllib.parse.urlsplit(base_url)
    # http.client, not urllib.request: proxy settings in the environment must not
    # reroute a loopback request.
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path} answered {response.status}: {body[:200]!r}")
        result: dict[str, int] = json.loads(body)
        return result
    finally:
        conn.close()


def fetch_stats(base_url: str) -> dict[str, int]:
    """The counters of a fake server (in any process), read over HTTP from ``/stats``."""
    return _stats_request(base_url, "GET", "/stats")


def reset_stats(base_url: str) -> None:
    """Reset the counters of a fake server (in any process) via ``POST /stats/reset``."""
    _stats_request(base_url, "POST", "/stats/reset")


if __name__ == "__main__":
    sys.exit(main())
