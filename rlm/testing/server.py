"""FakeLLMServer: the facade that configures, starts and stops the fake model server.

Holds the public :class:`FakeLLMServer` (options, lifecycle on the caller's loop or a
background thread, counters and the request log as properties) and the routes that are
the server's own (``/stats``, the 404 for unknown paths). It must not hold a provider's
wire format (``openai_api``...), the request pipeline (``hub``) or what the model says
(``model``, ``responders``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from rlm.testing import anthropic_api, batches, openai_api, openai_dialects
from rlm.testing.batches import BatchOptions, BatchStore
from rlm.testing.caching import PromptCache
from rlm.testing.fastpath import FastConnection
from rlm.testing.faults import Fault
from rlm.testing.hub import Hub
from rlm.testing.limits import Limit, RateLimits
from rlm.testing.model import FakeModel
from rlm.testing.responders import JSONResponder, Responder, ScriptItem
from rlm.testing.wire import json_payload, respond

__all__ = ["FakeLLMServer"]

# A body past this is refused (413) so a misbehaving client cannot make the server
# buffer without bound; batch input files may be up to 200 MB.
_MAX_BODY = 256 * 1024 * 1024
# How long stop() lets a request in flight finish before cancelling it: none is
# waited for, a stopped fake server drops every connection at once.
_SHUTDOWN_S = 0.01


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
    without structured output do. ``latency`` is fixed seconds or a ``(lo, hi)`` range
    drawn uniformly per request, waited with a timer so N concurrent requests take about
    one latency in all. ``model`` is the name ``/v1/models`` lists first and the model of
    a request that names none. ``reasoning`` maps model names to the reasoning tokens
    each reply reports (``completion_tokens_details.reasoning_tokens``).

    ``limits={model: Limit | {"rps"/"rpm": .., "tpm": .., ...}}`` gives each model its
    own request and token buckets (the key ``"*"``: every other model); see
    :class:`Limit`. Every reply to such a model carries OpenAI's ``x-ratelimit-*``
    headers (Anthropic's ``anthropic-ratelimit-*`` on its routes) and a request the
    buckets refuse gets a 429 at once, with ``retry-after-ms`` and ``retry-after`` and the
    provider's error body; ``stats()["models"][name]["rate_limited"]`` counts them.
    ``prefix_cache`` (default on) reports ``prompt_tokens_details.cached_tokens`` for a
    prompt of at least 1,024 tokens whose prefix an earlier request to the same model
    shared, in 128-token steps, as OpenAI does; on Anthropic's routes it reports
    ``cache_creation_input_tokens`` the first time a prefix up to a ``cache_control``
    breakpoint is seen and ``cache_read_input_tokens`` later (per model; prefixes shorter
    than ``anthropic_cache_min_tokens`` are not cached).

    ``batches=BatchOptions(delay=..., failure_rate=..., expire_after=..., seed=...)``
    shapes the Batch APIs (OpenAI's ``/v1/files`` and ``/v1/batches``, Anthropic's
    ``/v1/messages/batches``): see :class:`BatchOptions`. Batch lines are answered by
    the same responders and counted apart from live requests (``stats()``:
    ``batch_lines`` per model and in all, ``batches_created``, ``files_created``).
    ``fast_path`` (default on) serves OpenAI chat completions on a hand-written HTTP/1.1
    protocol that hands a connection to aiohttp.web at its first other request, since
    aiohttp cost several times the server CPU per chat request that benchmarks pay for.

    ``start()``/``with`` serve on a background thread (responders then run on that thread);
    ``astart()``/``async with`` serve on the caller's running loop. ``url`` is the base
    URL for the OpenAI SDK.
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
        reasoning: Mapping[str, int] | None = None,
        limits: Mapping[str, Limit | Mapping[str, Any]] | None = None,
        prefix_cache: bool = True,
        anthropic_cache_min_tokens: int = 1024,
        batches: BatchOptions | None = None,
        fast_path: bool = True,
    ) -> None:
        self._model = FakeModel(
            responder,
            scripts=scripts,
            json_responder=json_responder,
            response_format=response_format,
            reasoning=reasoning,
        )
        self._hub = Hub(
            self._model,
            latency,
            limits=RateLimits(limits),
            cache=PromptCache(anthropic_cache_min_tokens) if prefix_cache else None,
        )
        self._batches = BatchStore(self._hub, batches or BatchOptions(), lambda: self.root_url)
        self.host = host
        self.model = model
        self._requested_port = port
        self._bound_port: int | None = None

        self._fast_path = fast_path
        self._fast_open: set[FastConnection] = set()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None

    # -- configuration -------------------------------------------------------------

    @property
    def responder(self) -> Responder:
        """The function that answers unscripted, unstructured requests; assignable."""
        return self._model.responder

    @responder.setter
    def responder(self, value: Responder) -> None:
        self._model.responder = value

    @property
    def json_responder(self) -> JSONResponder | None:
        """The function that answers structured requests, if any; assignable."""
        return self._model.json_responder

    @json_responder.setter
    def json_responder(self, value: JSONResponder | None) -> None:
        self._model.json_responder = value

    @property
    def response_format(self) -> bool:
        """Whether structured requests are served (False: refused with a 400)."""
        return self._model.response_format

    @response_format.setter
    def response_format(self, value: bool) -> None:
        self._model.response_format = value

    @property
    def latency(self) -> float | tuple[float, float]:
        """Simulated seconds per chat request: fixed, or a ``(lo, hi)`` uniform range."""
        return self._hub.latency

    @latency.setter
    def latency(self, value: float | tuple[float, float]) -> None:
        self._hub.set_latency(value)

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def url(self) -> str:
        """Base URL for the OpenAI SDK, ``http://127.0.0.1:PORT/v1``; valid after start."""
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """The server's root, ``http://127.0.0.1:PORT`` (what the anthropic SDK and Azure
        clients take as their base URL); valid after start."""
        if self._bound_port is None:
            raise RuntimeError(
                "FakeLLMServer is not serving yet: call start() or await astart() first"
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port}"

    # -- counters ------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Model requests received since the last reset (every protocol, batches apart)."""
        return self._hub.requests

    @property
    def in_flight(self) -> int:
        """Model requests received and not yet answered (hung ones included)."""
        return self._hub.in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most model requests in flight at once since the last reset."""
        return self._hub.peak_in_flight

    @property
    def streams(self) -> int:
        """Model requests that asked for a stream since the last reset."""
        return self._hub.streams

    @property
    def faults_served(self) -> int:
        """Faults played (injected or returned by a responder) since the last reset."""
        return self._hub.faults_served

    @property
    def connections(self) -> int:
        """TCP connections accepted since the last reset (shows connection-pool reuse)."""
        return self._hub.connections

    @property
    def open_connections(self) -> int:
        """TCP connections open right now."""
        runner = self._runner
        server = runner.server if runner is not None else None
        handed = len(server.connections) if server is not None else 0
        return len(self._fast_open) + handed

    @property
    def requests_log(self) -> list[dict[str, Any]]:
        """The last 1000 model requests, oldest first, as a copy. Each entry has ``model``,
        ``messages`` (as sent), ``params`` (every other body field), ``protocol``
        (``"openai"``, ``"anthropic"``...), ``path``, ``query`` (the URL's query
        parameters), ``auth_headers`` (which of Authorization, api-key, x-api-key and
        x-goog-api-key were sent; never their values), ``key_hint`` (the key's last four
        characters, as providers' consoles show keys) and ``has_authorization``; an answered
        Anthropic request also has ``usage``, the usage object its reply reported (cache
        reads and writes included)."""
        with self._hub.lock:
            return list(self._hub.log)

    def stats(self) -> dict[str, Any]:
        """All counters as a dict, read together under one lock: ``requests``,
        ``in_flight``, ``peak_in_flight``, ``streams``, ``faults_served``,
        ``connections``, ``open_connections``, and ``models``: per model name, its
        ``requests``, ``rate_limited`` (429s drawn) and ``batch_lines``."""
        out = self._hub.stats()
        out["open_connections"] = self.open_connections
        return out

    def reset_counters(self) -> None:
        """Zero the counters and clear ``requests_log``; ``in_flight`` is a gauge of
        requests still open, so it is kept and the peak restarts from it, and queued
        faults are not touched."""
        self._hub.reset()

    def inject(
        self,
        kind: str,
        count: int = 1,
        *,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
        message: str | None = None,
    ) -> None:
        """Queue a fault (see :class:`Fault` for the kinds and options) for the next
        ``count`` model requests, played before any responder runs, first in first out;
        safe to call from any thread while the server runs."""
        if count < 0:
            raise ValueError("count must be >= 0")
        fault = Fault(
            kind,
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            headers=headers or {},
            status=status,
            message=message,
        )
        self._hub.queue_faults(fault, count)

    # -- lifecycle: the caller's loop ------------------------------------------------

    async def astart(self) -> FakeLLMServer:
        """Start serving on the running event loop and return self once listening."""
        if self._runner is not None:
            raise RuntimeError("FakeLLMServer is already serving")
        loop = asyncio.get_running_loop()
        self._hub.stopping = asyncio.Event()
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            # A client that gives up ends its request here too (a hang, a long latency).
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_S,
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        hub = self._hub
        wire = openai_api.OpenAIWire(hub.ids.__next__, hub.cache)
        opened = self._fast_open

        def accept() -> asyncio.BaseProtocol:
            with hub.lock:
                hub.connections += 1
            if not self._fast_path:
                return server()
            return FastConnection(hub, wire, lambda: self.model, server, opened)

        try:
            # A deep backlog so a burst of thousands of connects is not refused.
            self._listener = await loop.create_server(
                accept, self.host, self._requested_port, backlog=65535
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._loop = loop
        self._bound_port = self._listener.sockets[0].getsockname()[1]
        return self

    async def astop(self) -> None:
        """Stop serving and close every connection, hung ones too; idempotent."""
        runner, listener = self._runner, self._listener
        if runner is None or listener is None:
            return
        self._runner = self._listener = None
        self._hub.stopping.set()
        listener.close()
        for conn in list(self._fast_open):
            conn.abort()
        # abort() reports connection_lost on the next loop turn; let those run so no
        # socket outlives stop() (that would warn as a ResourceWarning).
        for _ in range(100):
            if not self._fast_open:
                break
            await asyncio.sleep(0)
        await runner.cleanup()
        await listener.wait_closed()
        self._loop = None
        self._bound_port = None

    async def __aenter__(self) -> FakeLLMServer:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()

    # -- lifecycle: a background thread ---------------------------------------------

    def start(self) -> FakeLLMServer:
        """Serve on a background thread with its own event loop; return self once listening."""
        if self._runner is not None or self._thread is not None:
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
            if self._runner is not None:
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

    # -- routes ----------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The models ``/v1/models`` lists: the default one, then the scripted ones."""
        return list(dict.fromkeys([self.model, *self._model.scripts]))

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        openai_api.add_routes(app, self._hub, self.model_names)
        anthropic_api.add_routes(app, self._hub)
        openai_dialects.add_routes(app, self._hub, self.model_names)
        batches.add_routes(app, self._batches)
        for prefix in ("", "/v1"):
            app.router.add_route("*", f"{prefix}/stats", self._stats_route)
            app.router.add_route("*", f"{prefix}/stats/reset", self._reset_route)
        app.router.add_route("*", "/{tail:.*}", self._unknown_route)
        return app

    async def _stats_route(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return respond(openai_api.not_allowed())
        return respond(json_payload(200, self.stats()))

    async def _reset_route(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return respond(openai_api.not_allowed())
        self.reset_counters()
        return respond(json_payload(200, self.stats()))

    async def _unknown_route(self, request: web.Request) -> web.StreamResponse:
        return respond(
            openai_api.error_payload(404, f"Unknown path {request.path!r}", code="unknown_url")
        )
