"""AsyncOpenAIClient: one pooled aiohttp transport, a limiter, retries, usage and cost.

Every request runs on rlm's engine loop (``rlm.loop``), whichever loop or thread the
caller awaits from: the connection pool lives in exactly one place, so it is reused by
every batch, and a sync caller blocked inside a running loop (a Jupyter cell) never
starves the loop that does the I/O. Awaiting from another loop costs one thread-safe
hand-off per call (per batch for ``completion_batch``), not per request.

What goes on the wire is a provider adapter's business (``rlm.providers``: it builds
the HTTP request and parses replies, errors, streams and rate-limit headers); this
module is the one layer every provider shares: the aiohttp session, the limiter,
retries and back-off, the cache in front and usage behind. Errors are ``rlm.errors``
types throughout; the openai SDK is not on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from rlm import loop as engine
from rlm.cache import Cache, RequestCache, open_cache
from rlm.errors import (
    BatchError,
    BudgetExhaustedError,
    ClientClosedError,
    ConfigError,
    LLMConnectionError,
    LLMError,
    LLMTimeoutError,
    RateLimitError,
    RequestTooLargeError,
    ResponseError,
)
from rlm.gc_tuning import fewer_full_collections
from rlm.limiter import OK, OTHER, REJECTED, AdaptiveLimiter, Ticket
from rlm.pacing import Pacer, PacingState, check_limits
from rlm.providers import Adapter, HTTPRequest, Reply, Request, adapter_class, resolve_model
from rlm.retries import RetryNotice, RetryPolicy, is_refusal
from rlm.usage import (
    DEFAULT_PRICES,
    BudgetLedger,
    ModelUsage,
    Price,
    PriceSpec,
    Usage,
    UsageMeter,
    estimate_parts,
    estimate_tokens,
    lookup_price,
    resolve_prices,
    token_details,
)

__all__ = [
    "DEFAULT_PRICES",
    "AsyncOpenAIClient",
    "ModelUsage",
    "Reply",
    "Request",
    "RetryNotice",
    "Usage",
    "UsageMeter",
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

Prompt = str | Sequence[Mapping[str, Any]]

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_CONCURRENCY = 64
KEEPALIVE_S = 60.0
LARGE_BATCH = 1000


class BatchRoute(Protocol):
    """The Batch API hook a batch-mode job installs on a client (``rlm.batchapi``).

    ``claims(ledger)``: the call belongs to one of the job's tries. ``answer`` returns an
    object with ``reply``, ``paid`` ("batch", "live" or None for a stored reply) and
    ``first`` (count it in this client's usage), raises (the call's error, or
    ``BatchPending``), or returns None to send the call live as usual. ``handed_back``
    is told what the caller's code got.
    """

    def claims(self, ledger: BudgetLedger) -> bool: ...

    async def answer(self, request: Request, ledger: BudgetLedger) -> Any: ...

    def handed_back(self, ledger: BudgetLedger, results: Sequence[Any]) -> None: ...


def _messages(prompt: Prompt) -> list[Mapping[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        return list(prompt)
    raise TypeError(
        f"a prompt must be a str or a list of chat messages (dicts with role and content), "
        f"not {type(prompt).__name__}"
    )


class _Lane:
    """One model on the client's endpoint: its limiter (with its pacer), and the largest
    completion it has returned (for token estimates of requests without max_tokens)."""

    __slots__ = ("largest_completion", "limiter", "model")

    def __init__(self, model: str, width: int, given: Mapping[str, float]) -> None:
        self.model = model
        self.largest_completion = 0
        pacer = Pacer(given.get("rpm"), given.get("tpm"), time.monotonic())
        self.limiter = AdaptiveLimiter(width, pacer=pacer, cost_of=self.cost)

    def cost(self, request: Request) -> float:
        """The token estimate pacing charges ``request`` (the budget ledger's estimate)."""
        return estimate_tokens(request.prompt_chars(), request.max_tokens, self.largest_completion)


class _Tries:
    """One call's retry bookkeeping: the attempt number and the failures so far."""

    __slots__ = ("attempt", "backoffs", "failures", "started")

    def __init__(self) -> None:
        self.attempt = 1
        self.failures = 0
        self.backoffs = 0
        self.started = time.monotonic()


def _failure_text(error: BaseException) -> str:
    """A short line for what failed, for retry notices."""
    if isinstance(error, LLMError) and error.status is not None:
        return f"{error.status}: {error}"[:200]
    return f"{type(error).__name__}: {error}"[:200]


def _soon_on_engine(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the engine loop (now, when already there)."""
    if engine.in_engine_thread():
        fn(*args)
    else:
        engine.engine_loop().call_soon_threadsafe(fn, *args)


class _Transport:
    """The client's one aiohttp session: pooled keep-alive connections, typed failures.

    Created on the engine loop. Timeouts become ``LLMTimeoutError`` and failures to
    connect or dropped connections ``LLMConnectionError``, so the retry layer sees the
    same vocabulary whichever provider is on the other end.
    """

    def __init__(self, timeout: float) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._timeout_s = timeout
        # Keep idle connections for a minute: a root model often thinks for more than a
        # few seconds between two batches, and re-opening thousands of connections costs
        # seconds (measured in benchmarks/fanout.py). No connector limit: the limiter
        # bounds what is in flight.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
        )
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        # A stream may run longer than one timeout in all, but never that long silent.
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=timeout
        )

    def _failure(self, exc: BaseException) -> LLMError:
        if isinstance(exc, TimeoutError | self._aiohttp.ServerTimeoutError):
            return LLMTimeoutError(f"no answer within {self._timeout_s:g} s")
        # No connection at all (nothing listening, an unknown host) is "refused": a
        # server that is not running does not start because we retry.
        refused = isinstance(exc, self._aiohttp.ClientConnectorError)
        return LLMConnectionError(f"{type(exc).__name__}: {exc}", refused=refused)

    async def post(self, http: HTTPRequest) -> tuple[int, Mapping[str, str], bytes]:
        """POST ``http`` and read the whole answer: (status, headers, body)."""
        try:
            async with self.session.post(
                http.url, data=http.body, headers=http.headers, timeout=self.timeout
            ) as resp:
                return resp.status, resp.headers, await resp.read()
        except (TimeoutError, self._aiohttp.ClientError) as exc:
            raise self._failure(exc) from exc

    @contextlib.asynccontextmanager
    async def stream(self, http: HTTPRequest) -> AsyncIterator[Any]:
        """POST ``http`` and hold the open response (its status and headers are read)."""
        try:
            async with self.session.post(
                http.url, data=http.body, headers=http.headers, timeout=self.stream_timeout
            ) as resp:
                yield resp
        except (TimeoutError, self._aiohttp.ClientError) as exc:
            raise self._failure(exc) from exc

    async def events(self, resp: Any) -> AsyncIterator[tuple[str, str]]:
        """The server-sent events of an open response: (event name, joined data lines)."""
        name, data = "", []
        pending = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                pending += chunk
                start = 0
                while (end := pending.find(b"\n", start)) >= 0:
                    line = pending[start:end].decode("utf-8", "replace").rstrip("\r")
                    start = end + 1
                    if not line:
                        if data:
                            yield name, "\n".join(data)
                        name, data = "", []
                        continue
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "data":
                        data.append(value)
                    elif field == "event":
                        name = value
                del pending[:start]
        except (TimeoutError, self._aiohttp.ClientError) as exc:
            raise self._failure(exc) from exc
        if data:
            yield name, "\n".join(data)

    async def close(self) -> None:
        await self.session.close()


def _first_of_each(
    todo: list[int], keys: Sequence[str | None]
) -> tuple[list[int], dict[int, list[int]]]:
    """Split batch indices into the first of each key and, per first, its later twins."""
    first: dict[str, int] = {}
    order: list[int] = []
    twins: dict[int, list[int]] = {}
    for i in todo:
        key = keys[i]
        if key is None:
            order.append(i)
            continue
        lead = first.setdefault(key, i)
        if lead == i:
            order.append(i)
        else:
            twins.setdefault(lead, []).append(i)
    return order, twins


_open_clients: weakref.WeakSet[AsyncOpenAIClient] = weakref.WeakSet()


async def _close_all_clients() -> None:
    for client in list(_open_clients):
        await client._aclose_on_engine()


engine.on_shutdown(_close_all_clients)


class AsyncOpenAIClient:
    """An OpenAI-compatible chat client built for fan-out.

    One pooled aiohttp session, created lazily on rlm's engine loop (the constructor
    does no network I/O), speaking one provider's wire format through its adapter
    (``rlm.providers``). Parameters:

    - ``model``: the model sent with each request unless a call overrides it, with an
      optional provider prefix (see ``provider``; default: $RLM_MODEL, else gpt-4o-mini).
    - ``api_key``: the endpoint's key (default: the provider's variable:
      $OPENAI_API_KEY, $ANTHROPIC_API_KEY, $AZURE_OPENAI_API_KEY, $GEMINI_API_KEY).
      Without any key the first request raises ``ConfigError`` (``check_key()`` asks
      now); a local server that needs none takes any value.
    - ``base_url``: the endpoint, such as http://localhost:8000/v1 for an
      OpenAI-compatible server or https://api.anthropic.com for Anthropic (default:
      the provider's variable: $OPENAI_BASE_URL, $ANTHROPIC_BASE_URL,
      $AZURE_OPENAI_ENDPOINT, $GEMINI_BASE_URL; else the provider's own endpoint).
    - ``max_concurrency``: requests in flight at once per model (default 64). A batch
      or job that can use more raises it unless it was given here.
    - ``timeout``: seconds one HTTP attempt may take before it is retried (default 120).
    - ``max_retries``: retries of one call after 408, 409, 5xx other than 503 and 529,
      timeouts and dropped connections, with jittered exponential back-off (default 6).
    - ``retry_timeout_s``: how long one call keeps retrying in all; refusals (429, 503,
      529) are retried until then, however many (default 300).
    - ``max_retry_wait_s``: the longest single wait a server may ask for (Retry-After
      and its kin, always honoured); a longer one fails the call at once with a
      ``RateLimitError`` carrying the delay (default 120).
    - ``rpm`` / ``tpm``: requests and tokens per minute this client may send to each
      model, paced before sending (default: learned from the provider's rate-limit
      headers and from its refusals); ``limits`` sets them per model,
      ``{"gpt-5-mini": {"rpm": 5000, "tpm": 2_000_000}}``. A request whose token
      estimate exceeds a model's tpm fails at once with ``RequestTooLargeError``.
    - ``prices``: model name to USD per 1M (input, output) tokens, for ``usage``'s cost;
      extends the built-in table and the prices file named by $RLM_PRICES.
    - ``cache``: None/False (default: nothing stored), True (the per-user cache
      directory), a directory, or an ``rlm.cache.Cache``: replies are reused from it.
      Identical requests in flight at once are sent once whatever this is (see
      rlm.cache); ``cache=False`` on a call opts that call out.
    - ``cache_read`` / ``cache_write``: False sends everything (identical requests in
      flight included) / stores nothing.
    - ``provider``: the wire format, a name from ``rlm.providers.provider_names()``; it
      also picks the environment variables of the key and the endpoint. Default: the
      model string's prefix (``anthropic/claude-sonnet-4-5`` is Anthropic's Messages
      API, ``azure/DEPLOYMENT`` Azure OpenAI, ``gemini/...`` Gemini, ``openai/...``
      OpenAI), else "openai" (OpenAI-compatible chat completions at ``base_url``). The
      prefix is not part of the model name sent, counted and priced.
    - ``on_retry``: called on the engine loop with a ``RetryNotice`` each time a call
      is about to be retried (what failed, the attempt, the wait), for live displays.

    Every model gets its own lane (see rlm.limiter and rlm.pacing): a flood of calls
    to one model never delays another's.

    Use it as ``async with AsyncOpenAIClient(...) as client`` or call ``await
    client.close()``; from sync code use ``rlm.loop.run_sync(client....)``.

    Inside the package, core, repl and the cache use a small interface instead of the
    privates: ``request`` builds a ``Request``, ``send``/``send_many`` send them with a
    per-run ``UsageMeter`` (``new_meter``), a ``BudgetLedger`` and a progress callback.
    """

    def __init__(
        self,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        max_concurrency: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 6,
        prices: Mapping[str, PriceSpec] | None = None,
        cache: Any = None,
        cache_read: bool = True,
        cache_write: bool = True,
        provider: str | None = None,
        *,
        retry_timeout_s: float = 300.0,
        max_retry_wait_s: float = 120.0,
        rpm: float | None = None,
        tpm: float | None = None,
        limits: Mapping[str, Mapping[str, float]] | None = None,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> None:
        if max_concurrency is not None and (
            not isinstance(max_concurrency, int) or max_concurrency < 1
        ):
            raise ConfigError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not timeout or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        for name, value in (("retry_timeout_s", retry_timeout_s),
                            ("max_retry_wait_s", max_retry_wait_s)):
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
        named = model or os.environ.get("RLM_MODEL") or DEFAULT_MODEL
        if provider is None:
            provider, named = resolve_model(named)
        else:
            named = named.removeprefix(provider + "/")
        self._adapter_cls = adapter_class(provider)
        #: The provider whose wire format, endpoint and key this client uses.
        self.provider: str = provider
        env = self._adapter_cls.base_url_env
        self.model: str = named
        self.base_url: str | None = base_url or (os.environ.get(env) if env else None) or None
        self._api_key = api_key or os.environ.get(self._adapter_cls.key_env) or None
        self._prefix = provider + "/"
        # Whether the user chose the width: a batch or job widens only a default one.
        self._width_given = max_concurrency is not None
        self.max_concurrency = max_concurrency or DEFAULT_CONCURRENCY
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.retry = RetryPolicy(max_retries, float(retry_timeout_s), float(max_retry_wait_s))
        # Limits and prices may name models with their provider prefix: keyed here by
        # the names requests carry.
        self._limits = {resolve_model(k)[1]: v for k, v in check_limits(limits, rpm, tpm).items()}
        self._on_retry = on_retry
        if isinstance(prices, Mapping):
            prices = {resolve_model(str(k))[1]: v for k, v in prices.items()}
        self._meter = UsageMeter(resolve_prices(prices))
        self._lanes: dict[str, _Lane] = {}
        self._adapter: Adapter | None = None
        self._transport: _Transport | None = None
        self._closed = False
        self._batch_route: BatchRoute | None = None
        store = open_cache(cache)
        # No store and no reuse: nothing to do per request, so no cache layer at all.
        self._replies: RequestCache | None = (
            RequestCache(store, read=cache_read, write=cache_write,
                         owns_store=not isinstance(cache, Cache))
            if store is not None or cache_read else None
        )

    def __repr__(self) -> str:
        where = self.base_url or self._adapter_cls.default_base_url
        return (
            f"AsyncOpenAIClient(model={self.model!r}, base_url={where!r}, "
            f"max_concurrency={self.max_concurrency})"
        )

    # -- public surface ---------------------------------------------------------------

    @property
    def usage(self) -> Usage:
        """A snapshot of calls, tokens and cost so far (safe to read from any thread)."""
        return self._meter.snapshot()

    @property
    def in_flight(self) -> int:
        """Requests currently sent and not yet answered, all models together."""
        return sum(lane.limiter.in_flight for lane in list(self._lanes.values()))

    @property
    def concurrency_limit(self) -> int:
        """How many requests the default model's lane may have in flight right now
        (fewer than max_concurrency while a new lane's first replies are out)."""
        return self._lane(self.model).limiter.capacity

    def rate_limits(self) -> dict[str, PacingState]:
        """Per model, the limits pacing follows now: requests and tokens per minute
        (given or learned from headers) and any rate learned from refusals."""
        return {model: lane.limiter.pacer.state() for model, lane in list(self._lanes.items())}

    def widen(self, max_concurrency: int) -> None:
        """Let each model have up to ``max_concurrency`` requests in flight, unless the
        width was given to the constructor (then this does nothing); never narrows.
        A batch or job calls it with what its tasks can use."""
        if self._width_given or max_concurrency <= self.max_concurrency:
            return
        self.max_concurrency = max_concurrency
        for lane in list(self._lanes.values()):
            _soon_on_engine(lane.limiter.set_max_limit, max_concurrency)

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    def check_key(self) -> None:
        """Raise ``ConfigError`` now if no API key (or no endpoint, for a provider that has
        no default one: Azure) is configured (no network I/O).

        The client itself checks on its first request; an RLM calls this when it is
        built, so a missing key fails once, before any sandbox starts.
        """
        if not (self.base_url or self._adapter_cls.default_base_url):
            raise ConfigError(
                f"no endpoint for {self.provider}/ models: set the "
                f"{self._adapter_cls.base_url_env} environment variable or pass base_url="
            )
        if not self._api_key:
            raise ConfigError(
                f"no API key: set the {self._adapter_cls.key_env} environment variable or pass "
                "api_key= "
                "(for a local OpenAI-compatible server that needs none, pass any value, "
                "e.g. api_key='local')"
            )

    @property
    def limiter(self) -> AdaptiveLimiter:
        """The default model's limiter (see rlm.limiter); each model has its own."""
        return self._lane(self.model).limiter

    @property
    def prices(self) -> dict[str, Price]:
        """This client's price table (built-in, RLM_PRICES file, ``prices=``), a copy."""
        return dict(self._meter.prices)

    def price(self, model: str) -> Price | None:
        """What this client charges ``model`` at (USD per 1M tokens of each kind); None:
        unpriced."""
        return lookup_price(self._meter.prices, model)

    def count_call(self, reply: Any, *, batch: bool = False) -> None:
        """Count one call answered outside the live path (a Batch API result, ``batch``:
        at the batch price) in this client's ``usage``."""
        self._meter.record_reply(reply, batch=batch)

    @property
    def reply_cache(self) -> RequestCache | None:
        """This client's reply cache (its ``store``, ``read`` and ``write``); None: none."""
        return self._replies

    # -- the package-internal interface (core, repl, cache) --------------------------

    def request(self, prompt: Prompt, *, cache: bool = True, **params: Any) -> Request:
        """Build the ``Request`` for ``prompt`` (a str or chat messages) with body ``params``.

        The client's model is the default; ``params`` (``model``, ``temperature``...)
        go into the JSON body as given. ``cache=False`` makes it bypass the cache.
        """
        body: dict[str, Any] = {"model": self.model, "messages": _messages(prompt)}
        body.update(params)
        model = params.get("model")
        if isinstance(model, str) and model.startswith(self._prefix):
            body["model"] = model[len(self._prefix):]
        return Request(body, bool(cache))

    def model_name(self, model: str) -> str:
        """The name this client sends and counts ``model`` under: a model string with
        this client's provider prefix (``anthropic/claude-...``) without it."""
        return model.removeprefix(self._prefix)

    def new_meter(self, on_retry: Callable[[RetryNotice], None] | None = None) -> UsageMeter:
        """A fresh meter with this client's prices, for per-run accounting; ``on_retry``
        hears of each retry of a call made with it."""
        return UsageMeter(self._meter.prices, on_retry)

    async def send(
        self,
        request: Request,
        *,
        meter: UsageMeter | None = None,
        ledger: BudgetLedger | None = None,
        cached: list[bool] | None = None,
    ) -> str:
        """Send one request on the engine loop and return the reply text.

        The call counts in the client's usage and in ``meter``; with a ``ledger`` it
        reserves against the run's budget first and raises ``BudgetExhaustedError``
        (nothing sent) once the budget is spent. Other failures raise like
        ``completion``. ``cached``, a one-item list, is set to ``[True]`` when the
        reply came from the cache (or an identical request in flight).
        """
        return await self._on_engine(self._text(request, meter, ledger, cached))

    async def send_many(
        self,
        requests: Sequence[Request],
        *,
        meter: UsageMeter | None = None,
        ledger: BudgetLedger | None = None,
        on_item_done: Callable[[int, int], None] | None = None,
        cached: list[bool] | None = None,
    ) -> list[str | Exception]:
        """Send many requests concurrently (up to the limiter), in order, never raising per item.

        Each slot holds the reply text or the item's exception (``BudgetExhaustedError``
        for items the budget stopped before they were sent). Request tasks are created
        as slots free up, so a million items cost a window of tasks, not a million.
        ``on_item_done(done, total)`` runs on the engine loop as items finish.
        ``cached``, a list of ``len(requests)`` False, gets True for each item answered
        by the cache or by an identical request (in flight, or earlier in the batch).
        """
        return await self._on_engine(
            self._many(list(requests), meter, ledger, on_item_done, cached)
        )

    async def completion(self, prompt: Prompt, *, cache: bool = True, **params: Any) -> str:
        """Send one chat completion and return the reply text.

        ``prompt`` is a str (sent as one user message) or a list of chat messages.
        ``params`` go into the request body (``model``, ``temperature``,
        ``max_tokens``...). ``cache=False`` asks the model afresh even when the cache
        holds this request. Raises an ``rlm.errors.LLMError`` subclass when the call
        still fails after the retries, ``ConfigError`` when no API key is configured.
        """
        request = self.request(prompt, cache=cache, **params)
        return await self._on_engine(self._text(request, None, None))

    async def completion_batch(
        self,
        prompts: Sequence[Prompt],
        return_exceptions: bool = False,
        on_item_done: Callable[[int, int], None] | None = None,
        *,
        cache: bool = True,
        batch_api: bool = False,
        **params: Any,
    ) -> list[Any]:
        """Run many completions concurrently (up to the limiter) and keep their order.

        Every item runs even when some fail. With ``return_exceptions=False`` a failure
        raises ``BatchError`` carrying the successful results and the per-item errors;
        with ``True`` each failed slot holds its exception. ``on_item_done(done, total)``
        is called on the engine loop as items finish (for progress displays).
        Identical prompts are sent once; ``cache=False`` sends every one.
        ``batch_api=True`` sends what the cache does not have through the provider's
        Batch API instead (half the price; minutes to 24 h; see ``submit_batch``).
        """
        if isinstance(prompts, str | bytes):
            raise TypeError("completion_batch takes a list of prompts, not a single str")
        requests = [self.request(p, cache=cache, **params) for p in prompts]
        if batch_api:
            from rlm.batchapi.handle import complete_through_batches

            results = await self._on_engine(complete_through_batches(self, requests, on_item_done))
        else:
            results = await self._on_engine(self._many(requests, None, None, on_item_done))
        if not return_exceptions:
            errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
            if errors:
                raise BatchError([None if i in errors else r for i, r in enumerate(results)],
                                 errors)
        return results

    async def submit_batch(self, prompts: Sequence[Prompt | Request], *, settings: Any = None,
                           **params: Any) -> Any:
        """Submit ``prompts`` (or ``Request``s) to the provider's Batch API; returns a handle.

        The requests are grouped into batch files (one model per file, split at the
        provider's limits) and submitted now; ``params`` go into every request body.
        ``await handle.results()`` waits for them (polling with backoff), submits lines
        that failed for a reason worth retrying again, and returns the replies in
        order; ``handle.status()``, ``handle.cancel()`` and ``handle.ids`` are there too.
        ``settings`` (an ``rlm.batchapi.BatchSettings``) tunes polling, retries and the
        live fallback. See ``rlm.batchapi.BatchHandle``.
        """
        from rlm.batchapi.handle import BatchHandle

        if isinstance(prompts, str | bytes):
            raise TypeError("submit_batch takes a list of prompts, not a single str")
        requests = [p if isinstance(p, Request) else self.request(p, **params) for p in prompts]
        return await self._on_engine(BatchHandle.open(self, requests, settings))

    async def completion_stream(self, prompt: Prompt, **params: Any) -> AsyncIterator[str]:
        """Stream the reply as text pieces; usage is recorded from the final chunk."""
        request = self.request(prompt, **params)
        loop = engine.engine_loop()
        if asyncio.get_running_loop() is loop:
            async for piece in self._stream(request):
                yield piece
            return
        # Pump the stream on the engine loop into a queue on the caller's loop.
        here = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for piece in self._stream(request):
                    here.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                here.call_soon_threadsafe(queue.put_nowait, ("error", exc))
                return
            here.call_soon_threadsafe(queue.put_nowait, ("done", None))

        future = asyncio.run_coroutine_threadsafe(pump(), loop)
        try:
            while True:
                with engine.waking():
                    kind, value = await queue.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            future.cancel()

    async def structured(self, prompt: Prompt, schema: type[M], **params: Any) -> M:
        """Ask for JSON matching a pydantic model (JSON-schema response format), validated.

        Raises ``ResponseError`` if the reply is not valid for ``schema``.
        """
        from openai.lib._pydantic import to_strict_json_schema

        params = dict(params)
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": schema.__name__,
                "schema": to_strict_json_schema(schema),
                "strict": True,
            },
        }
        text = await self.completion(prompt, **params)
        try:
            return schema.model_validate_json(text)
        except Exception as exc:
            raise ResponseError(
                f"the reply does not match {schema.__name__}: {exc}; reply was {text[:200]!r}"
            ) from exc

    async def close(self) -> None:
        """Close the connection pool. Idempotent; later calls raise ClientClosedError."""
        if self._closed:
            return
        self._closed = True
        await self._on_engine(self._aclose_on_engine())

    def close_sync(self) -> None:
        """``close()`` for sync code (runs on the engine loop)."""
        if self._closed:
            return
        self._closed = True
        if engine.in_engine_thread():
            asyncio.ensure_future(self._aclose_on_engine())
        else:
            engine.run_sync(self._aclose_on_engine())

    async def __aenter__(self) -> AsyncOpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- engine-loop internals --------------------------------------------------------

    async def _on_engine(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = engine.engine_loop()
        if asyncio.get_running_loop() is loop:
            return await coro
        with engine.waking():
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def _ready(self) -> tuple[Adapter, _Transport]:
        """The adapter and the transport, made on first use (on the engine loop)."""
        if self._closed:
            raise ClientClosedError("this AsyncOpenAIClient is closed; create a new one")
        adapter, transport = self._adapter, self._transport
        if adapter is None or transport is None:
            self.check_key()
            assert self._api_key is not None
            adapter = self._adapter = self._adapter_cls(self.base_url, self._api_key)
            transport = self._transport = _Transport(self.timeout)
            _open_clients.add(self)
        return adapter, transport

    def provider_adapter(self) -> Adapter:
        """This client's provider adapter, made on first use (call on rlm's engine loop)."""
        return self._ready()[0]

    # -- the Batch API hook (rlm.batchapi) ------------------------------------------------

    @property
    def batch_route(self) -> BatchRoute | None:
        """The Batch API route installed by a running batch-mode job, if any."""
        return self._batch_route

    def route_batches(self, route: BatchRoute | None) -> None:
        """Send the calls ``route`` claims through it instead of the live API (None: stop).

        A claimed call skips this client's cache (the route answers replays itself) and
        counts as the route says it was paid: at the batch price, at list price, or not
        at all (a stored reply). Calls it does not claim are untouched.
        """
        self._batch_route = route

    def _routed(self, ledger: BudgetLedger | None) -> BatchRoute | None:
        route = self._batch_route
        if route is None or ledger is None or not route.claims(ledger):
            return None
        return route

    async def _via_route(self, route: BatchRoute, request: Request, meter: UsageMeter | None,
                         ledger: BudgetLedger) -> Reply:
        hold = await ledger.reserve(request.model, request.prompt_chars(), request.max_tokens)
        try:
            answer = await route.answer(request, ledger)
        except BaseException:
            ledger.cancel(hold)
            raise
        if answer is None:
            ledger.cancel(hold)
            return await self._budgeted(request, meter, ledger)
        reply = answer.reply
        if answer.paid is None:
            ledger.cancel(hold)
            self._count_cached(meter, reply)
            return reply  # type: ignore[no-any-return]  # a stored reply reads like a Reply
        batch = answer.paid == "batch"
        if answer.first:
            self._meter.record_reply(reply, batch=batch)
        if meter is not None:
            meter.record_reply(reply, batch=batch)
        ledger.settle_reply(hold, reply, batch=batch)
        return reply  # type: ignore[no-any-return]

    async def _aclose_on_engine(self) -> None:
        if self._replies is not None:
            await self._replies.aclose()
        transport, self._transport = self._transport, None
        _open_clients.discard(self)
        if transport is not None:
            await transport.close()

    def _lane(self, model: str) -> _Lane:
        """The lane of ``model`` on this client's endpoint, made on first use."""
        lane = self._lanes.get(model)
        if lane is None:
            given = self._limits.get(model) or self._limits.get("*") or {}
            lane = self._lanes.setdefault(model, _Lane(model, self.max_concurrency, given))
        return lane

    def _final_error(self, exc: BaseException, attempts: int, why: str = "") -> LLMError:
        """The error a call ends with: what failed, after how many retries, the server's
        own words, and why retrying stopped when that is not the obvious."""
        retries = attempts - 1
        tail = f"after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else "(no retry)"
        note = f" ({why})" if why else ""
        if isinstance(exc, LLMTimeoutError):
            return LLMTimeoutError(f"no answer within {self.timeout:g} s {tail}{note}",
                                   attempts=attempts)
        if isinstance(exc, LLMConnectionError):
            if exc.refused:
                where = self.base_url or self._adapter_cls.default_base_url
                # The advice first and the socket's words kept out: run errors are cut
                # at 200 characters, and the user needs the URL and what to check.
                return LLMConnectionError(
                    f"cannot connect to {where} (connection refused): is the server running, "
                    "and is the base URL right?", attempts=attempts, refused=True)
            return LLMConnectionError(f"connection failed {tail}{note}: {exc}", attempts=attempts)
        if isinstance(exc, LLMError) and exc.status is not None and not isinstance(
            exc, ResponseError
        ):
            status, after = exc.status, exc.retry_after
            if status == 429 or isinstance(exc, RateLimitError):
                return RateLimitError(f"rate limited {tail}{note}: {exc}", status=status,
                                      attempts=attempts, retry_after=after)
            if status >= 500:
                return LLMError(f"server error {status} {tail}{note}: {exc}", status=status,
                                attempts=attempts, retry_after=after)
            return LLMError(f"request rejected ({status}): {exc}", status=status,
                            attempts=attempts)
        if isinstance(exc, LLMError):
            exc.attempts = attempts
            return exc
        if isinstance(exc, ValueError):  # JSON decoding
            return ResponseError(f"the endpoint's reply is not valid JSON: {exc}",
                                 attempts=attempts)
        return LLMError(f"{type(exc).__name__}: {exc}", attempts=attempts)

    def _too_large(self, lane: _Lane, request: Request) -> RequestTooLargeError:
        tokens = lane.limiter.pacer.tokens
        limit = int(tokens.capacity) if tokens is not None else 0
        return RequestTooLargeError(
            f"the request to {lane.model} is estimated at {lane.cost(request):,.0f} tokens "
            f"(prompt {request.prompt_chars():,} chars / 4 + {request.max_tokens or 'default'} "
            f"completion), more than its limit of {limit:,} tokens per minute; split the "
            "prompt or lower max_tokens"
        )

    async def _turn(self, lane: _Lane, request: Request, meter: UsageMeter | None) -> Ticket:
        """Wait for the lane to let ``request`` go; time held back by pacing or a pause
        (not by the in-flight limit) counts as waiting for rate limits."""
        limiter = lane.limiter
        pacer = limiter.pacer
        if pacer.counts_tokens and pacer.too_large(lane.cost(request)):
            raise self._too_large(lane, request)
        paced = limiter.pacing_delay(request) > 0
        start = time.monotonic() if paced else 0.0
        ticket = await limiter.acquire(request)
        if paced:
            self._waited(meter, time.monotonic() - start)
        return ticket

    def _waited(self, meter: UsageMeter | None, seconds: float) -> None:
        self._meter.rate_limit_wait(seconds)
        if meter is not None:
            meter.rate_limit_wait(seconds)

    async def _retry_or_raise(self, lane: _Lane, tries: _Tries, error: Exception,
                              meter: UsageMeter | None) -> None:
        """After a failed attempt: sleep until the retry, or raise the call's final error."""
        refusal = is_refusal(error)
        if refusal:
            self._meter.refused()
            if meter is not None:
                meter.refused()
            if not (isinstance(error, LLMError) and error.retry_after is not None):
                tries.backoffs += 1
        else:
            tries.failures += 1
        verdict = self.retry.verdict(error, failures=tries.failures, backoffs=tries.backoffs,
                                     elapsed=time.monotonic() - tries.started)
        delay = verdict.delay
        if delay is None:
            self._meter.failed()
            if meter is not None:
                meter.failed()
            final = self._final_error(error, tries.attempt, verdict.why)
            if final is error:
                raise error
            raise final from error
        notice = RetryNotice(lane.model, _failure_text(error), tries.attempt, delay, refusal)
        self._meter.retried(notice)
        if meter is not None:
            meter.retried(notice)
        if self._on_retry is not None:
            try:
                self._on_retry(notice)
            except Exception:  # noqa: BLE001, S110 - a display must not stop a call
                pass
        if refusal:
            self._waited(meter, delay)
        tries.attempt += 1
        await asyncio.sleep(delay)

    def _estimated(self, lane: _Lane, request: Request, reply: Reply) -> Reply:
        """A reply whose server reported no usage, with the reservation estimate as its
        tokens (so budgets still bind), marked estimated."""
        prompt, completion = estimate_parts(request.prompt_chars(), request.max_tokens,
                                            lane.largest_completion)
        return dataclasses.replace(reply, prompt_tokens=prompt, completion_tokens=completion)

    def _record(self, meter: UsageMeter | None, reply: Reply) -> None:
        self._meter.record_reply(reply)
        if meter is not None:
            meter.record_reply(reply)

    async def _text(
        self, request: Request, meter: UsageMeter | None, ledger: BudgetLedger | None,
        cached: list[bool] | None = None,
    ) -> str:
        return (await self._reply(request, meter, ledger, cached)).text

    async def _reply(
        self, request: Request, meter: UsageMeter | None, ledger: BudgetLedger | None,
        cached: list[bool] | None = None,
    ) -> Reply:
        """One call on the engine loop: the cache first, then the network (``_fresh``)."""
        route = self._routed(ledger)
        if route is not None:
            assert ledger is not None
            try:
                return await self._via_route(route, request, meter, ledger)
            except BaseException as exc:
                route.handed_back(ledger, [exc])
                raise
        replies = self._replies
        if replies is None or not request.cache:
            return await self._fresh(request, meter, ledger)
        if self._closed:
            raise ClientClosedError("this AsyncOpenAIClient is closed; create a new one")
        (key,), known = await replies.prepare(self.base_url, [request.body])
        reply, reused = await self._resolve(
            replies, request, key, known.get(key) if key else None, meter, ledger
        )
        if reused and cached:
            cached[0] = True
        return reply

    async def _resolve(
        self, replies: RequestCache, request: Request, key: str | None, known: Any,
        meter: UsageMeter | None, ledger: BudgetLedger | None,
    ) -> tuple[Reply, bool]:
        """A reply from the cache, from an identical request in flight, or sent now, and
        whether it was reused.

        A reused reply asks nothing of the ledger (it costs no budget) and counts as a
        cached call, with what it saved, in the client's usage and ``meter``.
        """
        reply, reused = await replies.resolve(
            key, lambda: self._fresh(request, meter, ledger), known
        )
        if reused:
            self._count_cached(meter, reply)
        return reply, reused  # type: ignore[return-value]  # a stored reply reads like a Reply

    def _count_cached(self, meter: UsageMeter | None, reply: Any, calls: int = 1) -> None:
        """Count ``calls`` calls answered by ``reply`` without a request of their own."""
        details = {name: count * calls for name, count in token_details(reply).items()}
        self._meter.cached(reply.model, reply.prompt_tokens * calls,
                           reply.completion_tokens * calls, calls, **details)
        if meter is not None:
            meter.cached(reply.model, reply.prompt_tokens * calls,
                         reply.completion_tokens * calls, calls, **details)

    def _fresh(
        self, request: Request, meter: UsageMeter | None, ledger: BudgetLedger | None
    ) -> Coroutine[Any, Any, Reply]:
        """The path every request that is sent takes: budget, limiter, retries, usage.

        A plain function returning the coroutine, so an unbudgeted call pays no extra
        frame. The cache sits in front of it (``_reply``, ``_many``): a reused reply
        never reaches the ledger.
        """
        if ledger is None:
            return self._exchange(request, meter)
        route = self._routed(ledger)
        if route is not None:
            return self._via_route(route, request, meter, ledger)
        return self._budgeted(request, meter, ledger)

    async def _budgeted(
        self, request: Request, meter: UsageMeter | None, ledger: BudgetLedger
    ) -> Reply:
        hold = await ledger.reserve(request.model, request.prompt_chars(), request.max_tokens)
        try:
            reply = await self._exchange(request, meter)
        except BaseException:
            ledger.cancel(hold)
            raise
        ledger.settle_reply(hold, reply)
        return reply

    async def _exchange(self, request: Request, meter: UsageMeter | None) -> Reply:
        adapter, transport = (self._adapter, self._transport)
        if adapter is None or transport is None:
            adapter, transport = self._ready()
        lane = self._lanes.get(request.model) or self._lane(request.model)
        limiter = lane.limiter
        http = adapter.build(request)
        tries: _Tries | None = None
        while True:
            ticket = None
            if not limiter.pacer.counts_tokens:
                ticket = limiter.try_acquire(request)
            if ticket is None:
                ticket = await self._turn(lane, request, meter)
            outcome, retry_after, limits, error = OTHER, None, None, None
            try:
                status, headers, raw = await transport.post(http)
                limits = adapter.parse_limits(headers)
                if status != 200:
                    raise adapter.parse_error(status, headers, raw)
                reply = adapter.parse_reply(json.loads(raw), request)
                outcome = OK
            except Exception as exc:  # noqa: BLE001 - classified below
                error = exc
                if is_refusal(exc):
                    outcome = REJECTED
                    retry_after = exc.retry_after  # type: ignore[attr-defined]
            finally:
                # Whatever happened (a reply, an error, a cancellation, a KeyboardInterrupt
                # on this thread), the slot goes back and the next waiter is woken.
                limiter.release(ticket, outcome, retry_after, limits)
            if error is None:
                break
            if tries is None:
                tries = _Tries()
            await self._retry_or_raise(lane, tries, error, meter)
        if not reply.usage_reported:
            reply = self._estimated(lane, request, reply)
        elif reply.completion_tokens > lane.largest_completion:
            lane.largest_completion = reply.completion_tokens
        self._record(meter, reply)
        return reply

    async def _many(
        self,
        requests: list[Request],
        meter: UsageMeter | None,
        ledger: BudgetLedger | None,
        on_item_done: Callable[[int, int], None] | None,
        cached: list[bool] | None = None,
    ) -> list[Any]:
        if self._closed:
            raise ClientClosedError("this AsyncOpenAIClient is closed; create a new one")
        total = len(requests)
        results: list[Any] = [None] * total
        if not total:
            return results
        done = 0

        def report() -> None:
            if on_item_done is not None:
                try:
                    on_item_done(done, total)
                except Exception:  # noqa: BLE001, S110 - a progress display must not stop work
                    pass

        route = self._routed(ledger)
        # A routed batch skips the cache: the route answers replays itself.
        replies = self._replies if route is None else None
        keys: list[str | None] = []
        order: Sequence[int] = range(total)
        # Items identical to an earlier one of this batch (same key): they wait for it
        # instead of taking a window slot, so a batch sends each distinct request once.
        twins: dict[int, list[int]] = {}
        if replies is not None:
            keys, todo = await self._from_cache(replies, requests, results, meter, cached)
            done = total - len(todo)
            if done:
                report()
            if not todo:
                return results
            order, twins = _first_of_each(todo, keys)
        self._ready()  # a missing key is one ConfigError, not one per item
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        live: dict[int, asyncio.Task[None]] = {}
        next_index = 0
        pending = len(order)
        fresh = self._fresh
        resolve = self._resolve

        def start_next() -> None:
            nonlocal next_index, done
            while next_index < pending:
                i = order[next_index]
                next_index += 1
                if ledger is not None and ledger.exhausted is not None:
                    # Spent: the rest are refused without a task each.
                    refused = BudgetExhaustedError(f"budget exhausted ({ledger.exhausted})")
                    results[i] = refused
                    for j in twins.pop(i, ()):
                        results[j] = refused
                        done += 1
                    done += 1
                    report()
                    continue
                live[i] = loop.create_task(one(i))
                return
            if done == total and not finished.done():
                finished.set_result(None)

        async def one(i: int) -> None:
            nonlocal done
            same = twins.pop(i, None)
            try:
                request = requests[i]
                if replies is None or not request.cache:
                    reply = await fresh(request, meter, ledger)
                else:
                    reply, reused = await resolve(replies, request, keys[i], None, meter, ledger)
                    if reused and cached is not None:
                        cached[i] = True
                results[i] = reply.text
                if same:
                    for j in same:
                        results[j] = reply.text
                        if cached is not None:
                            cached[j] = True
                    self._count_cached(meter, reply, len(same))
            except Exception as exc:  # noqa: BLE001 - kept per item, nothing is lost
                results[i] = exc
                for j in same or ():
                    results[j] = exc
            del live[i]
            done += 1 + (len(same) if same else 0)
            report()
            start_next()

        # A window of tasks, refilled as each finishes: a million items never make a
        # million tasks, and the window keeps every limiter slot busy.
        for _ in range(min(pending, self.max_concurrency)):
            start_next()
        try:
            with fewer_full_collections(pending >= LARGE_BATCH):
                await finished
        except BaseException:
            next_index = pending
            tasks = list(live.values())
            for task in tasks:
                task.cancel()
            # Let them give their slots and holds back before the caller moves on.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if route is not None:
            assert ledger is not None
            route.handed_back(ledger, results)
        return results

    async def _from_cache(
        self, replies: RequestCache, requests: list[Request], results: list[Any],
        meter: UsageMeter | None, cached: list[bool] | None,
    ) -> tuple[list[str | None], list[int]]:
        """Fill ``results`` with the replies the cache already has, in one pass.

        Returns every item's key (None: not cacheable) and the indices still to send.
        Hits cost no task and no request, and one meter update per model.
        """
        total = len(requests)
        keys: list[str | None] = [None] * total
        cacheable = [i for i, r in enumerate(requests) if r.cache]
        if not cacheable:
            return keys, list(range(total))
        if len(cacheable) == total:
            keys, known = await replies.prepare(self.base_url, [r.body for r in requests])
        else:
            some, known = await replies.prepare(
                self.base_url, [requests[i].body for i in cacheable]
            )
            for i, key in zip(cacheable, some, strict=True):
                keys[i] = key
        if not known:
            return keys, list(range(total))
        todo: list[int] = []
        saved: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            hit = known.get(key) if key is not None else None
            if hit is None:
                todo.append(i)
                continue
            results[i] = hit.text
            if cached is not None:
                cached[i] = True
            row = saved.get(hit.model)
            if row is None:
                row = saved[hit.model] = [0, 0, 0, 0, 0]
            row[0] += 1
            row[1] += hit.prompt_tokens
            row[2] += hit.completion_tokens
            # What it saved is priced as the original call was (a custom store may keep
            # no prompt-cache split: then at list price).
            row[3] += getattr(hit, "cached_input_tokens", 0)
            row[4] += getattr(hit, "cache_creation_tokens", 0)
        for model, (calls, prompt_tokens, completion_tokens, read, written) in saved.items():
            for counter in (self._meter, meter):
                if counter is not None:
                    counter.cached(model, prompt_tokens, completion_tokens, calls,
                                   cached_input_tokens=read, cache_creation_tokens=written)
        return keys, todo

    async def _stream(self, request: Request) -> AsyncIterator[str]:
        adapter, transport = self._ready()
        lane = self._lane(request.model)
        limiter = lane.limiter
        http = adapter.build(request, stream=True)
        tries: _Tries | None = None
        yielded = False
        while True:
            model = request.model
            usage: tuple[int, int] | None = None
            finish = None
            ticket = await self._turn(lane, request, None)
            outcome, retry_after, limits, error = OTHER, None, None, None
            try:
                async with transport.stream(http) as resp:
                    limits = adapter.parse_limits(resp.headers)
                    if resp.status != 200:
                        raise adapter.parse_error(resp.status, resp.headers, await resp.read())
                    async for name, data in transport.events(resp):
                        event = adapter.parse_stream_event(name, data)
                        if event is None:
                            continue
                        if event.error is not None:
                            raise event.error
                        model = event.model or model
                        if event.usage is not None:
                            # Some providers report usage on several events, running totals
                            # (Gemini on every chunk; Anthropic input first, output last):
                            # the largest of each side, never a sum.
                            usage = event.usage if usage is None else (
                                max(usage[0], event.usage[0]), max(usage[1], event.usage[1]))
                        finish = event.finish_reason or finish
                        if event.text:
                            yielded = True
                            yield event.text
                        if event.done:
                            break
                if finish is None:
                    raise LLMConnectionError(
                        "the stream ended without a finish reason: the answer was cut off"
                    )
                outcome = OK
            except Exception as exc:  # noqa: BLE001 - classified below
                error = exc
                if is_refusal(exc):
                    outcome = REJECTED
                    retry_after = exc.retry_after  # type: ignore[attr-defined]
            finally:
                limiter.release(ticket, outcome, retry_after, limits)
            if error is None:
                break
            if yielded:
                # Pieces already handed out would be repeated by a retry: fail instead.
                self._meter.failed()
                raise self._final_error(error, tries.attempt if tries else 1) from error
            if tries is None:
                tries = _Tries()
            await self._retry_or_raise(lane, tries, error, None)
        reply = Reply("", model, *(usage or (0, 0)), usage_reported=usage is not None)
        if not reply.usage_reported:
            reply = self._estimated(lane, request, reply)
        self._record(None, reply)
