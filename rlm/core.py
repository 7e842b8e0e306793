"""The RLM facade: a Recursive Language Model's configuration and public faces.

``RLM`` checks and keeps its settings, builds (or takes) the root and sub clients, and
offers the ways in: ``completion``/``acompletion``, ``acompletion_batch``, sessions,
jobs, ``interrupt`` and ``close``. It must not hold the work itself: one run's state and
root loop are ``rlm.run``, the sub-query service ``rlm.subqueries``, the result
``rlm.result``, sessions ``rlm.session``, jobs ``rlm.jobs``. Those never import this
module, so every import here points down and none comes back.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlm import loop as engine
from rlm import prompts
from rlm.batchapi.settings import BatchSettings
from rlm.cache import open_cache
from rlm.endpoints import root_client, sub_client_for
from rlm.errors import ConfigError, RunInterrupted
from rlm.gc_tuning import MANY_RUNS, fewer_full_collections
from rlm.jobs import runner as job_runner
from rlm.jobs.runner import JobSummary, JobTasks
from rlm.llm import AsyncOpenAIClient
from rlm.pacing import check_limits
from rlm.providers import adapter_class, check_endpoints, qualified_model
from rlm.repl import REPLEnv, default_sandbox
from rlm.result import RLMResult
from rlm.run import (
    DEFAULT_ROOT_WINDOW_TOKENS,
    INTERRUPT_GRACE_S,
    ActiveRuns,
    new_env,
    run_rlm,
    short_error,
)
from rlm.sandbox.modules import importable_modules
from rlm.sandbox.worker_pool import WorkerPool
from rlm.schema import Schema
from rlm.session import RLMSession, load_session
from rlm.subqueries import DEFAULT_SUB_WINDOW_CHARS, SUBCALL_RECORDING
from rlm.tracing import tracing_wanted
from rlm.usage import PRICE_HELP, PriceSpec, check_prices

# RLMResult and RLMSession are documented here too (``rlm.core.RLMResult``).
__all__ = ["RLM", "RLMResult", "RLMSession"]

# Sub-queries in flight per concurrent run a batch or job sizes the sub client for.
SUB_WIDTH_PER_TASK = 16


class RLM:
    """A Recursive Language Model: a root model driving a sandboxed REPL over the context.

    Models and endpoint:

    - ``model``: the root model, which writes the code (default: $RLM_MODEL, else
      gpt-4o-mini). A provider prefix picks the provider's native protocol, endpoint
      and key: ``anthropic/claude-sonnet-4-5``, ``azure/DEPLOYMENT``,
      ``gemini/gemini-2.5-flash``, ``openai/gpt-5-mini``; a bare name is
      OpenAI-compatible at ``base_url`` (see rlm.providers.resolve_model).
    - ``recursive_model``: what ``llm_query`` calls (default: ``model``); it may be on
      another provider than the root.
    - ``base_url``: the root model's provider's endpoint (default: that provider's
      variable, $OPENAI_BASE_URL for OpenAI-compatible, else its own endpoint).
    - ``api_key``: its key (default: the provider's variable, $OPENAI_API_KEY,
      $ANTHROPIC_API_KEY...). With no key at all the constructor raises
      ``ConfigError``; a local server that needs none takes any value.
    - ``endpoints``: per provider, ``{"anthropic": {"base_url": ..., "api_key": ...}}``,
      for a sub model on another provider than the root (``base_url``/``api_key``
      belong to the root's provider and win over its entry here).
    - ``client`` / ``sub_client``: ready ``AsyncOpenAIClient``s to use (and share
      between RLMs) instead of building them; they are not closed by ``close()``.
    - ``max_concurrency``: sub-queries in flight at once per model on the sub client
      this RLM builds (default 64, raised by ``acompletion_batch`` and jobs to what
      their tasks can use; given, it stays; ignored when ``sub_client`` is given).
    - ``prices``: model name to USD per 1M (input, output) tokens for the clients this
      RLM builds, so costs and ``max_cost_usd`` work for models the built-in table
      does not know (default: the built-in table and $RLM_PRICES). An entry is a pair,
      a ``Price``, or a dict that may add ``cached_input``, ``cache_write`` and
      ``batch_discount`` to ``input`` and ``output``.
    - ``limits``: requests and tokens per minute per model for the clients this RLM
      builds, ``{"gpt-5-mini": {"rpm": 5000, "tpm": 2_000_000}}``; calls are paced to
      them (default: learned from the provider's rate-limit headers and refusals).

    The loop and its limits:

    - ``max_iterations``: root turns (default 20). When they run out the root gets one
      last turn to answer; the result then has ``stopped_reason="max_iterations"``.
    - ``max_depth``: 1 (default) makes ``llm_query`` a plain model call; 2 or more runs
      a child RLM with its own REPL on the prompt, down to that depth.
    - ``max_cost_usd`` (US dollars), ``max_tokens`` (root plus sub tokens) and
      ``max_time_s`` (wall-clock seconds): budgets for one run, root and sub-calls
      together; a spent budget stops it with ``stopped_reason="budget"`` (default: none).
    - ``root_window_tokens``: once the root conversation is estimated above this many
      tokens, older turns are replaced by a summary (default 100,000; None: never).
    - ``sub_window_chars``: the longest sub-query prompt in characters; longer ones are
      refused before sending with a message the root can act on (default 500,000).

    The sandbox:

    - ``sandbox``: "process" runs REPL code in a worker process with wall and CPU
      time, memory, network and file limits; "local" runs it in this process under the
      compile-time policy only (faster, weaker). Default: "process" on Linux and macOS,
      "local" elsewhere (the same default as ``REPLEnv``).
    - ``reuse_workers``: with the process sandbox, a finished run's worker process is
      reset (variables, files, loop, requests all dropped; checked) and lent to the next
      run with the same limits, saving two forks per run (default True). Isolation
      between runs of this RLM then rests on the policy plus the reset, not on a new
      process; False starts a fresh worker for every run (see rlm.sandbox.worker_pool).
    - ``cell_timeout``: seconds one cell may run (default 60).
    - ``max_output_chars``: characters of a cell's output shown to the root (default
      20,000; the rest is cut to a head and a tail).
    - ``tools`` / ``tool_descriptions``: functions callable from REPL code by name,
      and the one-line descriptions the root is shown for them.
    - ``system_prompt``: replaces the built-in system prompt.

    Seeing a run:

    - ``log_dir``: write each run's trajectory as JSONL there, event by event (default:
      none; ``result.trajectory`` always has the events).
    - ``record_subcalls``: what the trajectory keeps of each sub-query: "capped"
      (default: prompt and reply cut to 2,000 characters each, head and tail), "full",
      or "none" (only counts and timings).
    - ``verbose``: show each iteration live in the terminal or notebook (default False).
    - ``tracing``: send each run's spans (GenAI semantic conventions) through
      OpenTelemetry: True, False, or None (default: the ``RLM_TRACING`` environment
      switch). Needs ``pip install 'rlm-sandbox[otel]'`` and an SDK set up by the program;
      prompts and replies go on spans only with
      ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (see rlm.tracing).
    - ``on_event``: a callable given every trajectory event as it happens (a custom
      live view, a progress line); it runs on the engine's threads and must be quick.
    - ``on_event`` is called with every trajectory event of every run (children's too,
      and the transient ``subcalls`` progress events), from whichever thread emits it,
      so it must be quick and thread-safe: a live view, a progress line, servers
      streaming progress.
    - A run with ``schema=`` gives the root ``max_answer_retries`` more tries after an
      answer that does not match (see ``completion``).

    Caching (see rlm.cache and the README):

    - ``cache``: None/False (default: nothing stored), True (the per-user cache
      directory), a directory, or an ``rlm.cache.Cache``; replies stored by earlier runs
      are reused by both clients this RLM builds, at no cost against the budgets.
    - ``cache_read`` / ``cache_write``: False sends everything (identical requests in
      flight included) / stores nothing.
    """

    def __init__(
        self,
        model: str | None = None,
        recursive_model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        max_iterations: int = 20,
        max_depth: int = 1,
        max_answer_retries: int = 2,
        sandbox: str | None = None,
        max_output_chars: int = 20_000,
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        max_time_s: float | None = None,
        log_dir: str | Path | None = None,
        verbose: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        record_subcalls: str = "capped",
        system_prompt: str | None = None,
        tools: Mapping[str, Callable[..., Any]] | None = None,
        tool_descriptions: Mapping[str, str] | None = None,
        root_window_tokens: int | None = DEFAULT_ROOT_WINDOW_TOKENS,
        client: AsyncOpenAIClient | None = None,
        sub_client: AsyncOpenAIClient | None = None,
        max_concurrency: int | None = None,
        cell_timeout: float = 60.0,
        sub_window_chars: int = DEFAULT_SUB_WINDOW_CHARS,
        prices: Mapping[str, PriceSpec] | None = None,
        cache: Any = None,
        cache_read: bool = True,
        cache_write: bool = True,
        reuse_workers: bool = True,
        limits: Mapping[str, Mapping[str, float]] | None = None,
        tracing: bool | None = None,
        endpoints: Mapping[str, Any] | None = None,
    ) -> None:
        # The keywords this RLM was made with, so another process can build its twin.
        self._settings: dict[str, Any] = {k: v for k, v in locals().items() if k != "self"}
        if not isinstance(max_iterations, int) or max_iterations < 1:
            raise ConfigError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
        if not isinstance(max_depth, int) or max_depth < 1:
            raise ConfigError(f"max_depth must be an int >= 1, got {max_depth!r}")
        if not isinstance(max_answer_retries, int) or max_answer_retries < 0:
            raise ConfigError(f"max_answer_retries must be an int >= 0, got {max_answer_retries!r}")
        if root_window_tokens is not None and (
            not isinstance(root_window_tokens, int) or root_window_tokens < 1000
        ):
            raise ConfigError(
                f"root_window_tokens must be an int >= 1000 or None (no compaction), "
                f"got {root_window_tokens!r}"
            )
        if not isinstance(sub_window_chars, int) or sub_window_chars < 100:
            raise ConfigError(f"sub_window_chars must be an int >= 100, got {sub_window_chars!r}")
        if sandbox is not None and sandbox not in ("local", "process"):
            raise ConfigError(f"sandbox must be 'local' or 'process', got {sandbox!r}")
        if record_subcalls not in SUBCALL_RECORDING:
            raise ConfigError(
                f"record_subcalls must be one of {', '.join(map(repr, SUBCALL_RECORDING))}, "
                f"got {record_subcalls!r}"
            )
        if prices is not None:
            prices = check_prices(prices)
        if limits is not None:
            if client is not None or sub_client is not None:
                raise ConfigError("limits= applies to the clients RLM creates; pass limits= "
                                  "to the AsyncOpenAIClient(s) you pass in instead")
            limits = check_limits(limits)
        if (cache not in (None, False) or not cache_read or not cache_write) and (
            client is not None or sub_client is not None
        ):
            raise ConfigError(
                "cache=, cache_read= and cache_write= apply to the clients RLM creates; "
                "pass them to the AsyncOpenAIClient(s) you pass in instead"
            )
        # One store for both clients this RLM creates; it is closed after them.
        self._cache = open_cache(cache)
        caching = {"cache": self._cache, "cache_read": cache_read, "cache_write": cache_write,
                   "limits": limits}
        self._owned: list[AsyncOpenAIClient] = []
        self._endpoints = check_endpoints(endpoints)
        if client is None:
            client = root_client(model, base_url=base_url, api_key=api_key,
                                 endpoints=self._endpoints, prices=prices, **caching)
            self._owned.append(client)
        # A missing key fails here, once, not as N failed results after N sandboxes started.
        client.check_key()
        self.client = client
        # Names without the provider prefix: what is sent, counted, priced and limited.
        self.model = client.model_name(model) if model else client.model
        if sub_client is None:
            sub_client = sub_client_for(
                client, recursive_model or qualified_model(client.provider, self.model),
                base_url=base_url, api_key=api_key, endpoints=self._endpoints,
                max_concurrency=max_concurrency, prices=prices, **caching)
            self._owned.append(sub_client)
        else:
            sub_client.check_key()
        self.sub_client = sub_client
        self.recursive_model = (sub_client.model_name(recursive_model) if recursive_model
                                else self.model)
        self.max_iterations = max_iterations
        self.max_depth = max_depth
        self.max_answer_retries = max_answer_retries
        self.sandbox = sandbox or default_sandbox()
        if not isinstance(reuse_workers, bool):
            raise ConfigError(f"reuse_workers must be True or False, got {reuse_workers!r}")
        self.reuse_workers = reuse_workers
        # Process-sandbox workers of finished runs, reset and lent to the next runs.
        self._worker_pool = WorkerPool() if self.sandbox == "process" and reuse_workers else None
        self.max_output_chars = max_output_chars
        for name, value in (("max_cost_usd", max_cost_usd), ("max_tokens", max_tokens),
                            ("max_time_s", max_time_s)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or value <= 0):
                raise ConfigError(f"{name} must be a positive number or None, got {value!r}")
        self.max_cost_usd = max_cost_usd
        self.max_tokens = max_tokens
        self.max_time_s = max_time_s
        self.prices = dict(prices or {})
        self._active = ActiveRuns()
        if max_cost_usd is not None:
            self._check_priced()
        self.log_dir = log_dir
        self.verbose = verbose
        self.on_event = on_event
        self.record_subcalls = record_subcalls
        self.tools = dict(tools or {})
        unknown = sorted(set(tool_descriptions or {}) - set(self.tools))
        if unknown:
            raise ConfigError(
                f"tool_descriptions names tools that were not passed in tools=: {', '.join(unknown)}"
            )
        self.tool_descriptions = dict(tool_descriptions or {})
        self.sub_window_chars = sub_window_chars
        self.root_window_tokens = root_window_tokens
        self._custom_system_prompt = system_prompt is not None
        self.system_prompt = system_prompt or self._default_system_prompt({})
        self.cell_timeout = cell_timeout
        self.tracing = tracing_wanted(tracing)

    def size_clients(self, tasks: int) -> None:
        """Let this RLM's clients carry what ``tasks`` runs at once can use: a root call
        each on the root client, ``SUB_WIDTH_PER_TASK`` sub-queries each on the sub
        client. A client whose ``max_concurrency`` was given keeps it."""
        self.client.widen(tasks)
        self.sub_client.widen(tasks * SUB_WIDTH_PER_TASK)

    def settings(self) -> dict[str, Any]:
        """The constructor keywords that build an equivalent RLM in another process.

        The Ray backend sends these to its workers. The endpoint and key are resolved
        here (from the environment if they were not passed), so workers need neither.
        An RLM made with ``client=``/``sub_client=`` or ``on_event=`` cannot be rebuilt
        elsewhere (those objects live in this process): ``ConfigError`` says so.
        """
        settings = dict(self._settings)
        passed = [k for k in ("client", "sub_client", "on_event") if settings.get(k) is not None]
        if passed:
            raise ConfigError(
                f"this RLM was made with {', '.join(passed)}=, which cannot be sent to "
                "another process; build it from model=, base_url= and api_key= instead"
            )
        root, sub = self.client.provider, self.sub_client.provider
        settings["base_url"] = settings.get("base_url") or self.client.base_url
        if settings.get("api_key") is None:
            settings["api_key"] = (self._endpoints.get(root, {}).get("api_key")
                                   or os.environ.get(adapter_class(root).key_env))
        settings["model"] = qualified_model(root, self.model)
        settings["recursive_model"] = qualified_model(sub, self.recursive_model)
        if sub != root:
            entry = dict(self._endpoints.get(sub, {}))
            if self.sub_client.base_url:
                entry.setdefault("base_url", self.sub_client.base_url)
            entry.setdefault("api_key", os.environ.get(adapter_class(sub).key_env) or "")
            settings["endpoints"] = {**self._endpoints, sub: entry}
        settings["verbose"] = False
        return settings

    def _default_system_prompt(self, protections: Mapping[str, Any]) -> str:
        """The built-in system prompt for an env with these protections: a confined worker
        also offers open() and the data libraries, and the prompt says so."""
        data = str(protections.get("data_modules") or "")
        return prompts.build_system_prompt(
            sub_window_chars=self.sub_window_chars,
            sub_model=self.recursive_model,
            tools=prompts.describe_tools(self.tools, self.tool_descriptions),
            modules=prompts.describe_imports(
                importable_modules([m.strip() for m in data.split(",") if m.strip()]),
                files=bool(protections.get("file_access")),
            ),
        )

    def system_prompt_for(self, env: REPLEnv) -> str:
        """The system prompt a run in ``env`` starts from: ``system_prompt=`` if one was
        given, else the built-in one, which names open() and the data libraries when the
        env's protections offer them."""
        if self._custom_system_prompt:
            return self.system_prompt
        protections = env.protections
        if not protections.get("file_access") and not protections.get("data_modules"):
            return self.system_prompt
        return self._default_system_prompt(protections)

    def _check_priced(self) -> None:
        """A cost budget over a model without a price would be a silent $0: refuse it."""
        for client, model, role in ((self.client, self.model, "root"),
                                    (self.sub_client, self.recursive_model, "sub")):
            price = self.prices.get(model) or client.price(model)
            if price is None:
                raise ConfigError(
                    f"max_cost_usd is set but the {role} model {model!r} has no price, so its "
                    f"cost would count as $0; {PRICE_HELP.format(model=model)}"
                )

    def __repr__(self) -> str:
        return (
            f"RLM(model={self.model!r}, recursive_model={self.recursive_model!r}, "
            f"sandbox={self.sandbox!r}, max_iterations={self.max_iterations}, max_depth={self.max_depth})"
        )

    # -- public API -------------------------------------------------------------------

    def completion(self, context: Any, query: str, schema: Any = None) -> RLMResult:
        """Answer ``query`` over ``context`` (sync; works inside a running loop too).

        ``schema`` asks for a typed answer (see ``acompletion``).
        """
        _check_query(query)
        typed = Schema.of(schema) if schema is not None else None
        ended: list[RLMResult] = []
        finished = threading.Event()

        async def run() -> RLMResult:
            try:
                return await run_rlm(self, context=context, query=query, depth=0, schema=typed,
                                     on_end=ended.append, active=self._active)
            finally:
                finished.set()

        try:
            return engine.run_sync(run())
        except KeyboardInterrupt as exc:
            # run_sync cancelled the run on the engine loop; let it stop its cell and
            # write its record before the caller (often about to exit) goes on.
            finished.wait(INTERRUPT_GRACE_S)
            raise RunInterrupted(ended[0] if ended else None) from exc

    async def acompletion(
        self,
        context: Any,
        query: str,
        schema: Any = None,
        *,
        env: REPLEnv | None = None,
        history: Sequence[tuple[str, str]] = (),
    ) -> RLMResult:
        """Answer ``query`` over ``context``; never raises for a failed run (see ``error``).

        ``schema`` (a pydantic model class, a type such as ``list[str]``, or a JSON
        Schema dict) asks for a typed answer: the root is shown the JSON Schema, its
        FINAL value is validated here, a mismatch is sent back for a fix, and
        ``result.output`` holds the validated object. A schema that is not one raises
        ConfigError at once. ``env`` runs the code in that REPLEnv (from ``new_env``;
        it stays open, with its variables) and ``history`` lists earlier (question,
        answer) pairs the root is told: what sessions use. Cancelling the task writes
        the run's record (``stopped_reason="interrupted"``) before the cancellation
        goes on.
        """
        _check_query(query)
        typed = Schema.of(schema) if schema is not None else None
        return await run_rlm(self, context=context, query=query, depth=0, schema=typed, env=env,
                             history=history, active=self._active)

    @property
    def worker_pool(self) -> WorkerPool | None:
        """The pool of reset process-sandbox workers this RLM's runs share (None with
        ``sandbox="local"`` or ``reuse_workers=False``); ``stats()`` shows its counts."""
        return self._worker_pool

    def new_env(self, context: Any) -> REPLEnv:
        """A REPLEnv holding ``context``, configured like this RLM's runs (sandbox, cell
        timeout, output cap, tools); pass it to ``acompletion(env=...)`` to keep
        variables across runs. The caller closes it."""
        return new_env(self, context)

    async def acompletion_batch(
        self,
        tasks: Iterable[tuple[Any, str] | Mapping[str, Any]],
        max_concurrency: int = 8,
        progress: bool = True,
        *,
        max_concurrent: int | None = None,
        schema: Any = None,
    ) -> list[RLMResult]:
        """Run many (context, query) tasks at once, each in its own REPLEnv, in order.

        ``tasks`` are ``(context, query)`` pairs or ``{"context": ..., "query": ...}``
        dicts. ``max_concurrency`` runs at most that many tasks at once (default 8;
        their sub-queries still share this RLM's clients and limiter). A failed task,
        a malformed one included (an empty query, a dict without "query"), is an
        RLMResult with ``error`` set and ``stopped_reason="error"``; it never stops the
        others. ``progress`` shows a bar with done, failed and ETA (default True).
        ``schema`` applies to every task; a task given as a mapping may carry its own
        ``"schema"`` instead. ``max_concurrent`` is the old name of ``max_concurrency``
        (deprecated).
        """
        if max_concurrent is not None:
            import warnings

            warnings.warn("acompletion_batch(max_concurrent=) is deprecated; use max_concurrency=",
                          DeprecationWarning, stacklevel=2)
            max_concurrency = max_concurrent
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        default = Schema.of(schema) if schema is not None else None
        self.size_clients(max_concurrency)
        items: list[tuple[Any, Any, Any]] = []
        for task in tasks:
            context, query = _task_fields(task)
            own = task.get("schema") if isinstance(task, Mapping) else None
            items.append((context, query, own if own is not None else default))
        bar = None
        if progress and items:
            from rlm.display import BatchProgress

            bar = BatchProgress()
            bar.start(len(items))
        gate = asyncio.Semaphore(max_concurrency)

        async def one(context: Any, query: Any, typed: Any) -> RLMResult:
            async with gate:
                try:
                    _check_query(query)
                    if typed is not None and not isinstance(typed, Schema):
                        typed = Schema.of(typed)  # a bad per-task schema fails that task only
                    result = await run_rlm(self, context=context, query=query, depth=0,
                                           schema=typed, active=self._active)
                except Exception as exc:  # noqa: BLE001 - one task's failure is its own
                    result = RLMResult(answer=None, stopped_reason="error", error=short_error(exc))
            if bar is not None:
                bar.advance(result.error is None)
            return result

        try:
            with fewer_full_collections(min(max_concurrency, len(items)) >= MANY_RUNS):
                return list(await asyncio.gather(*(one(c, q, t) for c, q, t in items)))
        finally:
            if bar is not None:
                bar.stop()

    def run_job(
        self,
        tasks: JobTasks,
        out: str | os.PathLike[str],
        *,
        query: str | None = None,
        fmt: str = "auto",
        encoding: str = "utf-8",
        concurrency: int = 8,
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        max_time_s: float | None = None,
        retry_failed: bool = False,
        sort_output: bool = False,
        progress: bool = True,
        backend: str = "local",
        ray_address: str | None = None,
        ray_chunk_size: int = 16,
        ray_workers: int | None = None,
        schema: Any = None,
        batch_api: bool | BatchSettings = False,
    ) -> JobSummary:
        """Run a many-document job: every task not yet in ``out`` is run and appended to it.

        ``tasks`` is a JSONL or CSV file, a directory of documents (with ``query=``, the
        query for all of them), or an iterable of ``rlm.jobs.Task`` or mappings
        ``{"id", "query", "context" | "context_path"}``; ``fmt`` ("auto", "text",
        "json", "jsonl") and ``encoding`` say how context files are read. Each finished task is one
        fsynced line of ``out``; running the same job again skips ids already there
        (``retry_failed=True`` re-runs those that ended in error). ``concurrency``
        tasks run at once; the job caps ``max_cost_usd``/``max_tokens``/``max_time_s``
        bind per model call on the local backend. ``schema`` asks for a typed answer
        per task (in each line's ``output``); ``sort_output`` rewrites ``out`` in input
        order at the end; ``progress`` shows a bar on stderr. ``backend`` is "local"
        or "ray" (with ``ray_address``, ``ray_chunk_size`` tasks per chunk and
        ``ray_workers`` workers). The sub-query cache is this RLM's ``cache=``.
        ``batch_api=True`` (or an ``rlm.batchapi.BatchSettings``) sends every model call
        of the job through the provider's Batch API at half the price: tasks wait for
        batches holding no sandbox, the job's state next to ``out`` survives a crash, and
        ``concurrency`` bounds the tasks running between two waits (see the README's
        "Half price with the Batch API"). Returns a ``JobSummary``; see the README's
        "Jobs" section.
        """
        return job_runner.run_job(
            self, tasks, out, query=query, fmt=fmt, encoding=encoding, concurrency=concurrency,
            max_cost_usd=max_cost_usd, max_tokens=max_tokens, max_time_s=max_time_s,
            retry_failed=retry_failed, sort_output=sort_output, progress=progress,
            backend=backend, ray_address=ray_address, ray_chunk_size=ray_chunk_size,
            ray_workers=ray_workers, schema=schema, batch_api=batch_api,
        )

    async def arun_job(
        self,
        tasks: JobTasks,
        out: str | os.PathLike[str],
        *,
        query: str | None = None,
        fmt: str = "auto",
        encoding: str = "utf-8",
        concurrency: int = 8,
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        max_time_s: float | None = None,
        retry_failed: bool = False,
        sort_output: bool = False,
        progress: bool = True,
        backend: str = "local",
        ray_address: str | None = None,
        ray_chunk_size: int = 16,
        ray_workers: int | None = None,
        schema: Any = None,
        batch_api: bool | BatchSettings = False,
    ) -> JobSummary:
        """``run_job`` for async code: the job's tasks run on the caller's event loop."""
        return await job_runner.arun_job(
            self, tasks, out, query=query, fmt=fmt, encoding=encoding, concurrency=concurrency,
            max_cost_usd=max_cost_usd, max_tokens=max_tokens, max_time_s=max_time_s,
            retry_failed=retry_failed, sort_output=sort_output, progress=progress,
            backend=backend, ray_address=ray_address, ray_chunk_size=ray_chunk_size,
            ray_workers=ray_workers, schema=schema, batch_api=batch_api,
        )

    def load_session(self, path: str | Path, context: Any) -> RLMSession:
        """A session over ``context`` that continues one saved with ``RLMSession.save``:
        the questions and answers, the usage so far and the saved variables are back."""
        return load_session(self, path, context)

    def session(self, context: Any) -> RLMSession:
        """A multi-turn session over ``context``: the REPL keeps its state across asks."""
        return RLMSession(self, context)

    def interrupt(self, reason: str = "the run was interrupted") -> None:
        """Stop every run of this RLM now, from any thread or loop.

        Each running cell is stopped (keeping what it printed), in-flight sub-queries
        are cancelled, and each run returns with ``stopped_reason="interrupted"`` and a
        complete record (``cell_result`` and ``run_end`` in its log).
        """
        self._active.halt_all("interrupted", reason)

    async def aclose(self) -> None:
        """Interrupt runs still going (they end "interrupted"), then close the clients this
        RLM created (not ones passed in)."""
        self.interrupt("the RLM was closed")
        if self._active:
            await asyncio.to_thread(self._active.wait_idle, INTERRUPT_GRACE_S)
        for c in self._owned:
            await c.close()
        self._close_stores()

    def close(self) -> None:
        """``aclose`` for sync code."""
        self.interrupt("the RLM was closed")
        if not engine.in_engine_thread():
            self._active.wait_idle(INTERRUPT_GRACE_S)
        for c in self._owned:
            c.close_sync()
        self._close_stores()

    def _close_stores(self) -> None:
        # What close and aclose release alike after the clients: the cache and the idle
        # sandbox workers.
        if self._cache is not None:
            self._cache.close()
        if self._worker_pool is not None:
            self._worker_pool.close()

    def __enter__(self) -> RLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()



def _task_fields(task: Any) -> tuple[Any, Any]:
    """(context, query) of one batch task; a malformed task yields a query that
    ``_check_query`` refuses, so only that task fails."""
    if isinstance(task, Mapping):
        return task.get("context"), task.get("query")
    if isinstance(task, tuple | list) and len(task) == 2:
        return task[0], task[1]
    return None, None


def _check_query(query: Any) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("query must be a non-empty str")

