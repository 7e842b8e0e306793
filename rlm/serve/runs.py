"""Running RLM queries for a server: one pair of clients for every request, progress out.

Both servers (OpenAI-compatible and MCP) hold one ``QueryRunner``. It owns the one root
client and the one sub-model client (so every request shares one connection pool and
one limiter on the engine loop), builds a light per-request ``RLM`` over them (a
request may pick the root model and lower the cost budget), and turns the run's
trajectory events into short progress lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm.cache import open_cache
from rlm.core import RLM, RLMResult
from rlm.endpoints import root_client, sub_client_for
from rlm.errors import ConfigError
from rlm.providers import check_endpoints, qualified_model, resolve_model
from rlm.schema import Schema
from rlm.usage import PriceSpec

__all__ = [
    "QueryRunner",
    "RunProgress",
    "UpstreamSettings",
    "accept_remote_schema",
    "progress_message",
    "result_metadata",
    "served_answer",
]

Event = dict[str, Any]


@dataclass(frozen=True)
class UpstreamSettings:
    """The upstream model endpoint and run limits, from the same flags as ``rlm run``.

    ``max_cost_usd``, ``max_tokens`` and ``max_time_s`` are the server's caps per run:
    a request may ask for less cost, never for more. ``prices`` extends the built-in
    price table (USD per 1M input and output tokens). ``cache`` and ``cache_read`` are
    the model-reply cache options of ``RLM`` (``rlm.cache``), shared by every request.
    ``sandbox`` None means the process sandbox where it exists. ``limits`` are the rate
    limits both clients pace to (``AsyncOpenAIClient(limits=...)``). ``endpoints`` gives
    a sub model on another provider than the root its endpoint and key
    (``RLM(endpoints=...)``).
    """

    model: str | None = None
    recursive_model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    max_iterations: int = 20
    max_depth: int = 1
    max_cost_usd: float | None = None
    max_tokens: int | None = None
    max_time_s: float | None = None
    prices: Mapping[str, PriceSpec] | None = None
    cache: Any = None
    cache_read: bool = True
    sandbox: str | None = None
    log_dir: str | Path | None = None
    max_concurrency: int = 64
    # Rate limits to pace to, per model: {"model": {"rpm": N, "tpm": N}} ("*": every model).
    limits: Mapping[str, Mapping[str, float]] | None = None
    # Per provider {"base_url": ..., "api_key": ...}, for a sub model on another provider.
    endpoints: Mapping[str, Any] | None = None


class QueryRunner:
    """Runs queries for a server over one shared root client and one sub-model client."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        # One reply store for both clients, closed after them (as RLM does for its own).
        self._cache = open_cache(settings.cache)
        caching = {"cache": self._cache, "cache_read": settings.cache_read}
        endpoints = check_endpoints(settings.endpoints)
        self.client = root_client(
            settings.model, base_url=settings.base_url, api_key=settings.api_key,
            endpoints=endpoints, prices=settings.prices, limits=settings.limits, **caching,
        )
        self.sub_client = sub_client_for(
            self.client, settings.recursive_model, base_url=settings.base_url,
            api_key=settings.api_key, endpoints=endpoints,
            max_concurrency=settings.max_concurrency, prices=settings.prices,
            limits=settings.limits, **caching,
        )
        # Provider-qualified, so a per-request RLM over these clients resolves it again.
        self.recursive_model = qualified_model(self.sub_client.provider, self.sub_client.model)

    @property
    def sandbox(self) -> str:
        """The sandbox runs use (the RLM default when the settings name none)."""
        return self.new_rlm().sandbox

    @property
    def root_model(self) -> str:
        """The default root model (what model id ``rlm`` means), with its provider prefix
        unless it is OpenAI-compatible."""
        return qualified_model(self.client.provider, self.client.model)

    def check_root_model(self, model: str) -> None:
        """``ConfigError`` unless a request's root model can run on the root client: a
        bare name, or one prefixed with the root client's provider."""
        provider, name = resolve_model(model)
        if name != model and provider != self.client.provider:
            raise ConfigError(
                f"this server's root model is on {self.client.provider}/, not {provider}/: "
                f"ask for 'rlm:{self.root_model}' or another {self.client.provider} model"
            )

    def budget(self, requested: float | None) -> float | None:
        """The cost budget of one run: the request's, capped by the server's."""
        cap = self.settings.max_cost_usd
        if requested is None:
            return cap
        if not isinstance(requested, int | float) or isinstance(requested, bool) or requested <= 0:
            raise ConfigError(f"max_cost_usd must be a positive number of USD, got {requested!r}")
        return float(requested) if cap is None else min(float(requested), cap)

    def new_rlm(
        self,
        *,
        model: str | None = None,
        max_cost_usd: float | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> RLM:
        """A per-request RLM over the shared clients (cheap: it owns no connection)."""
        s = self.settings
        return RLM(
            model=model or self.root_model,
            recursive_model=self.recursive_model,
            client=self.client,
            sub_client=self.sub_client,
            max_iterations=s.max_iterations,
            max_depth=s.max_depth,
            sandbox=s.sandbox,
            max_cost_usd=self.budget(max_cost_usd),
            max_tokens=s.max_tokens,
            max_time_s=s.max_time_s,
            log_dir=s.log_dir,
            on_event=on_event,
            # Requests come from different callers: a fresh worker process for each run.
            reuse_workers=False,
        )

    async def run(
        self,
        *,
        context: Any,
        query: str,
        model: str | None = None,
        max_cost_usd: float | None = None,
        schema: Any = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> RLMResult:
        """Run one query to the end; cancelling the awaiting task cancels the run.

        ``schema`` is a JSON Schema dict for a typed answer (``result.output``); an
        invalid one, or one a remote client could use against the host (regular
        expressions, outside references, exponential checking), raises ConfigError
        before anything is sent. It is accepted, and answers are checked against it, in
        the validation threads: the server's loop stays free.
        """
        if schema is not None:
            schema = await accept_remote_schema(schema)
        rlm = self.new_rlm(model=model, max_cost_usd=max_cost_usd, on_event=on_event)
        return await rlm.acompletion(context, query, schema=schema)

    async def aclose(self) -> None:
        """Close both clients (their pools live on the engine loop), then the cache."""
        await self.client.close()
        await self.sub_client.close()
        if self._cache is not None:
            self._cache.close()


class RunProgress:
    """Collects a run's events from any thread and hands them to one async consumer.

    ``sink`` is the ``on_event`` callback for the RLM; ``next()`` returns them on the
    loop that created this object, in order, then None after ``finish()``.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()

    def sink(self, event: Event) -> None:
        """Called by the run (root loop or engine thread) for every event."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the server's loop is gone: nobody is listening any more
            pass

    def finish(self) -> None:
        """End ``events()`` after the events already queued."""
        self._queue.put_nowait(None)

    async def next(self) -> Event | None:
        """The next event, or None once the run has finished (safe to cancel and retry)."""
        return await self._queue.get()


def progress_message(event: Event) -> str | None:
    """A one-line description of a trajectory event for a progress display, or None.

    Events of child runs (``max_depth`` > 1) are prefixed with ``child``. Events that
    carry nothing a watcher needs (the root request, the log-only ``final``) give None.
    """
    kind = event.get("type")
    prefix = "child " if event.get("child_run") else ""
    if kind == "run_start" and not prefix:
        return f"run started (root model {event.get('model')}, sandbox {event.get('sandbox')})"
    if kind == "root_reply":
        return f"{prefix}iteration {event.get('iteration')}: root model replied"
    if kind == "cell":
        return f"{prefix}iteration {event.get('iteration')}: running code block {int(event.get('index', 0)) + 1}"
    if kind == "cell_result":
        bits = [f"{prefix}iteration {event.get('iteration')}: code block {int(event.get('index', 0)) + 1} done"]
        if event.get("sub_calls"):
            bits.append(f"{event['sub_calls']} sub-queries")
        if event.get("error"):
            bits.append("error fed back to the root model")
        return ", ".join(bits)
    if kind == "subcalls":
        return f"{prefix}sub-queries {event.get('done')}/{event.get('total')}"
    if kind == "budget":
        return f"{prefix}budget reached: {event.get('reason')}"
    if kind == "error":
        return f"{prefix}error: {event.get('message')}"
    if kind == "run_end" and not prefix:
        return f"run finished ({event.get('stopped_reason')})"
    return None


def result_metadata(result: RLMResult) -> dict[str, Any]:
    """The ``rlm`` metadata of a finished run, JSON-ready: what both servers report."""
    data = result.to_dict()
    data.pop("answer", None)
    total = result.total_usage
    data["usage"]["total"] = total.to_dict()
    return data


def served_answer(result: RLMResult) -> str | None:
    """What a server may present as the answer of a finished run: None without one.

    A run stopped at its iteration limit answers with the root model's last-turn reply;
    unless that reply gave its answer with ``FINAL``, it is raw text that is often REPL
    code, so it is served as "" (no answer; ``stopped_reason`` says why) rather than
    shown to a client as the answer.
    """
    if result.answer is None or result.stopped_reason != "max_iterations":
        return result.answer
    last = next((e for e in reversed(result.trajectory) if e.get("type") == "final"), None)
    return result.answer if last is not None and last.get("source") != "last_turn" else ""


async def accept_remote_schema(schema: Any) -> Schema:
    """The ``Schema`` for a schema from a server's client, accepted in a validation thread
    (a ``Schema`` passes as is), refusing what the host should not run: the same rules as
    schemas from REPL code (plain JSON data, a size cap, no ``pattern`` or
    ``patternProperties`` whose regular expressions could stall the host, no outside
    ``$ref``, no exponential checking). Raises ConfigError with the reason."""
    if isinstance(schema, Schema):
        return schema
    from rlm.structured import acheck_subquery_schema

    try:
        return await acheck_subquery_schema(schema)
    except TypeError as exc:
        raise ConfigError(str(exc).replace("llm_query's schema", "the schema")) from None
