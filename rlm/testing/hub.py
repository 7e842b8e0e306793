"""The request pipeline every model route shares, and the counters it keeps.

Holds :class:`Hub`: the queue of injected faults, the request log, the counters
(requests, in flight and their peak, streams, faults, connections, per model), the
simulated latency and :meth:`Hub.exchange`, which takes a normalised chat call through
fault, model and latency to a reply in the calling route's wire format. It must not
hold any provider's shapes (the routes render them through a :class:`Wire`) nor the
server's lifecycle.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from rlm.testing.caching import PromptCache
from rlm.testing.faults import Fault
from rlm.testing.limits import Admission, RateLimits
from rlm.testing.model import Answer, ChatCall, FakeModel, Refusal
from rlm.testing.wire import Payload, deliver

__all__ = ["AUTH_HEADERS", "Hub", "Wire"]

LOG_SIZE = 1000
# Counters beyond the core ones that stats() always shows, zero until counted.
LISTED_COUNTERS = ("batch_lines", "batches_created", "files_created")
# Headers whose presence (never their value) the request log records.
AUTH_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")


def key_hint(headers: Mapping[str, str]) -> str | None:
    """The last four characters of the key a request carried (as providers' consoles show
    keys), so tests can tell which key reached which server; never more of it."""
    for name in AUTH_HEADERS:
        value = headers.get(name)
        if value:
            value = value.removeprefix("Bearer ").strip()
            return value[-4:] if value else None
    return None


class Wire(Protocol):
    """How one protocol renders what the pipeline decided."""

    def answer(self, call: ChatCall, answer: Answer, fault: Fault | None) -> Payload:
        """The reply carrying ``answer`` (shaped wrongly when ``fault`` is an answering one)."""
        ...

    def fault(self, call: ChatCall, fault: Fault) -> Payload:
        """The reply for a non-answering fault."""
        ...

    def refusal(self, call: ChatCall, refusal: Refusal) -> Payload:
        """The error reply for a refusal."""
        ...

    def limit_headers(self, admission: Admission) -> dict[str, str]:
        """The rate-limit headers that report ``admission``'s bucket states."""
        ...

    def rate_limited(self, call: ChatCall, admission: Admission) -> Payload:
        """The 429 for a request the limits refused."""
        ...


def _new_model_row() -> dict[str, int]:
    return {"requests": 0, "rate_limited": 0, "batch_lines": 0}


class Hub:
    """Counters, log, fault queue and the shared chat pipeline of one fake server."""

    def __init__(
        self,
        model: FakeModel,
        latency: float | tuple[float, float] = 0.0,
        *,
        limits: RateLimits | None = None,
        cache: PromptCache | None = None,
    ) -> None:
        self.model = model
        self.limits = limits if limits is not None else RateLimits()
        self.cache = cache
        self.lock = threading.Lock()
        self.faults: collections.deque[Fault] = collections.deque()
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_SIZE)
        self.ids = itertools.count(1)
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.streams = 0
        self.faults_served = 0
        self.connections = 0
        self.by_model: dict[str, dict[str, int]] = collections.defaultdict(_new_model_row)
        self.extra_counters: collections.Counter[str] = collections.Counter(
            dict.fromkeys(LISTED_COUNTERS, 0)
        )
        self.stopping = asyncio.Event()
        self.set_latency(latency)

    # -- configuration ------------------------------------------------------------------

    def set_latency(self, value: float | tuple[float, float]) -> None:
        """Fixed seconds per chat request, or a ``(lo, hi)`` range drawn uniformly."""
        if isinstance(value, tuple):
            lo, hi = float(value[0]), float(value[1])
        else:
            lo = hi = float(value)
        if lo < 0 or hi < lo:
            raise ValueError(
                f"latency must be >= 0 seconds, or (lo, hi) with 0 <= lo <= hi; got {value!r}"
            )
        self.latency = value
        # Two floats, so the hot path does no type checks.
        self.lat_lo = lo
        self.lat_hi = hi

    def draw_latency(self) -> float:
        """This request's simulated latency."""
        lo, hi = self.lat_lo, self.lat_hi
        return lo if lo == hi else random.uniform(lo, hi)

    # -- counters -------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a named counter beyond the core ones (files, batches...)."""
        with self.lock:
            self.extra_counters[name] += n

    def count_model(self, model: str, name: str, n: int = 1) -> None:
        """Add ``n`` to ``model``'s counter ``name``."""
        with self.lock:
            self.by_model[model][name] += n

    def stats(self) -> dict[str, Any]:
        """All counters, read together under one lock."""
        with self.lock:
            out: dict[str, Any] = {
                "requests": self.requests,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "streams": self.streams,
                "faults_served": self.faults_served,
                "connections": self.connections,
            }
            out["rate_limited"] = sum(row["rate_limited"] for row in self.by_model.values())
            out.update(self.extra_counters)
            out["models"] = {name: dict(row) for name, row in self.by_model.items()}
            return out

    def reset(self) -> None:
        """Zero the counters and clear the log; ``in_flight`` is a gauge, so it stays and the
        peak restarts from it; queued faults stay queued."""
        with self.lock:
            self.requests = 0
            self.peak_in_flight = self.in_flight
            self.streams = 0
            self.faults_served = 0
            self.connections = 0
            self.by_model.clear()
            self.extra_counters = collections.Counter(dict.fromkeys(LISTED_COUNTERS, 0))
            self.log.clear()

    def queue_faults(self, fault: Fault, count: int) -> None:
        """Queue ``fault`` for the next ``count`` chat requests."""
        with self.lock:
            self.faults.extend([fault] * count)

    # -- the pipeline ---------------------------------------------------------------------

    def log_entry(
        self, request: web.Request, call: ChatCall, raw_messages: list[Any]
    ) -> dict[str, Any]:
        """The request log's record of ``call`` as it came through aiohttp."""
        return self.entry(call, raw_messages, request.path, request.query, request.headers)

    @staticmethod
    def entry(
        call: ChatCall,
        raw_messages: list[Any],
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> dict[str, Any]:
        """The request log's record of ``call``: what was asked and the URL and auth shape
        it came with (auth header names only, never their values); ``headers`` must look
        names up case-insensitively or hold them in lower case."""
        return {
            "model": call.model,
            "messages": raw_messages,
            "params": call.params,
            "has_authorization": "authorization" in headers,
            "protocol": call.protocol,
            "path": path,
            "query": dict(query),
            "auth_headers": [name for name in AUTH_HEADERS if name in headers],
            "key_hint": key_hint(headers),
        }

    def begin(self, call: ChatCall, entry: dict[str, Any]) -> Fault | None:
        """Count a chat request in and log it; return the fault queued for it, if any."""
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            if self.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.in_flight
            if call.stream:
                self.streams += 1
            self.by_model[call.model]["requests"] += 1
            self.log.append(entry)
            return self.faults.popleft() if self.faults else None

    def end(self) -> None:
        """Count a chat request out (answered, dropped, or its client gone)."""
        with self.lock:
            self.in_flight -= 1

    def outcome(self, call: ChatCall, queued: Fault | None, wire: Wire) -> Payload:
        """The payload for ``call``: a queued fault first, else the model's reply (shaped
        wrongly when a queued or returned fault is an answering one)."""
        if queued is not None and not queued.answers:
            self._served()
            return wire.fault(call, queued)
        result = self.model.answer(call)
        shaping = queued
        if isinstance(result, Fault):
            if not result.answers:
                self._served()
                return wire.fault(call, result)
            # A responder's answering fault brings its own text, in ``message``.
            shaping = result
            result = self.model.settle(call, result.message or "")
        if isinstance(result, Refusal):
            return wire.refusal(call, result)
        assert isinstance(result, Answer)
        if shaping is not None:
            self._served()
        return wire.answer(call, result, shaping)

    def _served(self) -> None:
        with self.lock:
            self.faults_served += 1

    def prepare(
        self, call: ChatCall, wire: Wire, entry: dict[str, Any]
    ) -> tuple[Payload, float]:
        """Count and log ``call``, then decide its reply and when it goes out: a queued
        fault, or the 429 its model's rate limits give (at once, as a provider's gateway
        answers), or the model's reply rendered by ``wire`` after the latency. Every reply
        to a model with limits carries their headers. The caller must call :meth:`end`
        once the reply is out (or the client gone)."""
        queued = self.begin(call, entry)
        try:
            admission = None
            if queued is None and self.limits:
                admission = self.limits.admit(call.model, call.prompt_tokens, call.max_tokens)
            delay = self.draw_latency()
            if admission is not None and not admission.ok:
                self.count_model(call.model, "rate_limited")
                payload = wire.rate_limited(call, admission)
                delay = 0.0
            else:
                payload = self.outcome(call, queued, wire)
            if admission is not None:
                payload.headers.update(wire.limit_headers(admission))
            if call.usage is not None:
                with self.lock:
                    entry["usage"] = call.usage
            return payload, delay
        except BaseException:
            self.end()
            raise

    async def exchange(
        self, request: web.Request, call: ChatCall, wire: Wire, entry: dict[str, Any]
    ) -> web.StreamResponse:
        """Answer ``call`` on ``request`` as :meth:`prepare` decides."""
        payload, delay = self.prepare(call, wire, entry)
        try:
            return await deliver(request, payload, delay, self.stopping)
        finally:
            self.end()
