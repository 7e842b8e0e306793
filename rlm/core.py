"""RLM: the root loop, budgets, recursion, sessions and many tasks at once.

The root model never sees the context: it sees a description of it and drives a
REPLEnv where the context is a variable. Each iteration is one root completion; its
```repl blocks run in order and their (cut) outputs go back as the next user message.
The loop is sequential; the fan-out happens inside cells, through the sub-query
service below, which every env of a run (and every child run) shares with one client
and one limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm import loop as engine
from rlm import prompts
from rlm.cache import open_cache
from rlm.errors import BudgetExhaustedError, ConfigError, LLMError, RLMError, RunInterrupted
from rlm.llm import AsyncOpenAIClient
from rlm.parsing import find_code_blocks, find_final_in_text
from rlm.repl import ExecResult, REPLEnv, default_sandbox, describe_context, failed_slot
from rlm.sandbox.modules import importable_modules
from rlm.sandbox.worker_pool import WorkerPool
from rlm.schema import Schema, SchemaIssue, format_issues
from rlm.structured import acheck_subquery_schema, structured_batch, structured_query
from rlm.trajectory import Trajectory, cap_text, prompt_text
from rlm.usage import PRICE_HELP, BudgetLedger, Usage, check_budgetable, check_prices, outer_budget

# Current frontier models take 128k tokens or more; compact well before that so the
# reply and the next cell output still fit.
DEFAULT_ROOT_WINDOW_TOKENS = 100_000
# What a sub-model reads at once, in characters: about 125k tokens, the window of
# gpt-4o-mini and most current models. Longer sub-prompts are refused before sending.
DEFAULT_SUB_WINDOW_CHARS = 500_000
# Compaction keeps the system prompt, the first user message and this many latest
# messages (the last reply and the output it produced) verbatim.
_KEEP_RECENT = 2
# What a trajectory keeps of each sub-query (RLM(record_subcalls=...)), and the cap.
SUBCALL_RECORDING = ("capped", "full", "none")
SUBCALL_CAP_CHARS = 2_000

if TYPE_CHECKING:
    from rlm.jobs.runner import JobSummary


@dataclass
class RLMResult:
    """The outcome of one run.

    ``stopped_reason`` is "final" (the code called FINAL/FINAL_VAR, or the root wrote
    one), "max_iterations" (the last-turn answer), "budget" (a cost, token or time
    budget ran out: ``error`` says which), "invalid_answer" (a run with ``schema=``
    whose answer still did not match after ``max_answer_retries``) or "error"
    (``error`` says what failed). ``usage`` has "root" and "sub" ``Usage`` snapshots of
    this run alone.

    With ``schema=``, ``output`` is the validated object (a model instance, list, dict,
    number...) and ``answer`` its JSON text (a str output is the answer as is). After
    "invalid_answer", ``raw_output`` keeps the last value given to FINAL and
    ``validation_errors`` what was wrong with it (dicts of path, expected, received).
    """

    answer: str | None
    iterations: int = 0
    elapsed_s: float = 0.0
    usage: dict[str, Usage] = field(default_factory=lambda: {"root": Usage(), "sub": Usage()})
    sub_calls: int = 0
    stopped_reason: str = "final"
    error: str | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    log_path: str | None = None
    output: Any = None
    raw_output: Any = None
    validation_errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the run produced an answer without an error."""
        return self.answer is not None and self.error is None

    @property
    def total_usage(self) -> Usage:
        """Root and sub-model usage added up."""
        return self.usage["root"] + self.usage["sub"]

    def __repr__(self) -> str:
        answer = self.answer if self.answer is None or len(self.answer) <= 80 else self.answer[:77] + "..."
        total = self.total_usage
        extra = f", error={self.error!r}" if self.error else ""
        return (
            f"RLMResult(answer={answer!r}, stopped_reason={self.stopped_reason!r}, "
            f"iterations={self.iterations}, sub_calls={self.sub_calls}, "
            f"tokens={total.total_tokens}, cost={total.cost_text}, "
            f"elapsed_s={self.elapsed_s:.2f}{extra})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the trajectory is left out; it is in ``log_path``).

        ``output`` is the validated output as JSON data (null without a schema);
        ``raw_output`` and ``validation_errors`` appear after an invalid answer.
        """
        from pydantic_core import to_jsonable_python

        data: dict[str, Any] = {
            "answer": self.answer,
            "output": to_jsonable_python(self.output),
            "stopped_reason": self.stopped_reason,
            "error": self.error,
            "iterations": self.iterations,
            "sub_calls": self.sub_calls,
            "elapsed_s": round(self.elapsed_s, 3),
            "usage": {k: v.to_dict() for k, v in self.usage.items()},
            "log_path": self.log_path,
        }
        if self.stopped_reason == "invalid_answer":
            data["raw_output"] = to_jsonable_python(self.raw_output, fallback=repr)
            data["validation_errors"] = self.validation_errors
        return data

    def _repr_html_(self) -> str:
        from rlm.display import result_html

        return result_html(self)

    def __rich__(self) -> Any:
        from rlm.display import result_rich

        return result_rich(self)


class _Stopped(RLMError):
    """Ends a run early: ``kind`` is its stopped_reason ("budget" or "interrupted")."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class _Run:
    """State of one root-loop run: its meters, counters, trajectory, budget and stop switch.

    Every run of one tree (a root run, its child runs, every env they own) shares one
    ``BudgetLedger``. ``halt`` stops the run from any thread: the running cell is
    interrupted (it returns what it printed), in-flight sub-queries are cancelled, and
    the loop ends at the end of that cell with the halt's reason.
    """

    def __init__(
        self,
        rlm: RLM,
        depth: int,
        trajectory: Trajectory,
        run_child: Callable[..., Coroutine[Any, Any, RLMResult]],
        ledger: BudgetLedger,
    ) -> None:
        self.rlm = rlm
        self.depth = depth
        # Starts a child run (RLM._run) for recursive sub-queries.
        self.run_child = run_child
        self.trajectory = trajectory
        self.ledger = ledger
        self.root_meter = rlm.client.new_meter()
        self.sub_meter = rlm.sub_client.new_meter()
        self.sub_calls = 0
        self.iterations = 0
        self.started = time.monotonic()
        self.children: list[_Run] = []
        self.env: REPLEnv | None = None
        self.halted: _Stopped | None = None
        # Sub-query tasks in flight (on the engine loop), cancelled by halt().
        self._tasks: dict[asyncio.Task[Any], asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()

    def usage(self) -> dict[str, Usage]:
        root, sub = self.root_meter.snapshot(), self.sub_meter.snapshot()
        for child in self.children:
            child_usage = child.usage()
            # A child's root and sub calls are all sub-work from this run's view.
            sub = sub + child_usage["root"] + child_usage["sub"]
        return {"root": root, "sub": sub}

    def total_sub_calls(self) -> int:
        return self.sub_calls + sum(c.total_sub_calls() for c in self.children)

    @contextlib.contextmanager
    def tracking(self) -> Any:
        """Register the current task as one of this run's sub-queries while it runs."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        with self._lock:
            self._tasks[task] = asyncio.get_running_loop()
        try:
            if self.halted is not None:
                raise BudgetExhaustedError(f"the run was stopped ({self.halted})")
            yield
        finally:
            with self._lock:
                self._tasks.pop(task, None)

    def halt(self, kind: str, reason: str) -> None:
        """Stop the run now (any thread): interrupt its cell, cancel its sub-queries."""
        if self.halted is None:
            self.halted = _Stopped(kind, reason)
        env = self.env
        if env is not None:
            env.interrupt(reason)
        with self._lock:
            tasks = list(self._tasks.items())
        for task, loop in tasks:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing runs there
                loop.call_soon_threadsafe(task.cancel)
        for child in list(self.children):
            child.halt(kind, reason)

    def check_stop(self) -> None:
        """Raise ``_Stopped`` if the run was halted or its budget is spent."""
        if self.halted is not None:
            raise self.halted
        ledger = self.ledger
        if ledger.exhausted is not None or (
            ledger.deadline is not None and ledger.remaining_s() <= 0
        ):
            if ledger.exhausted is None:
                ledger.time_up()
            raise _Stopped("budget", ledger.describe())


class _SubQueryService:
    """What ``llm_query`` and friends call, for one run: counts, meters, progress, recursion.

    At depth < max_depth a sub-query is a child RLM run on the prompt (its own REPLEnv,
    the same clients and limiter); at the last depth it is a plain model call.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run

    def _record(self, prompts_: Sequence[Any], replies: Sequence[Any],
                cached: Sequence[bool] = ()) -> None:
        """Put the sub-queries' prompts and replies in the trajectory (one event per
        call of llm_query or llm_query_batch, so a 10,000-item batch is one line).
        A call the cache answered is marked ``"cached": true``."""
        mode = self._run.rlm.record_subcalls
        if mode == "none":
            return
        limit = SUBCALL_CAP_CHARS if mode == "capped" else None

        def keep(text: str) -> str:
            return text if limit is None else cap_text(text, limit)

        calls = [{"prompt": keep(prompt_text(p)), "reply": keep(_reply_text(r))}
                 for p, r in zip(prompts_, replies, strict=True)]
        for call, hit in zip(calls, cached, strict=False):
            if hit:
                call["cached"] = True
        self._run.trajectory.emit("sub_queries", iteration=self._run.iterations, calls=calls)

    async def query(self, prompt: str, params: dict[str, Any]) -> Any:
        cached = [False]
        with self._run.tracking():
            try:
                reply = await self._query(prompt, params, cached)
            except LLMError as exc:
                self._record([prompt], [failed_slot(exc)])
                raise
        self._record([prompt], [reply], cached)
        return reply

    async def _query(self, prompt: str, params: dict[str, Any], cached: list[bool]) -> Any:
        run = self._run
        run.sub_calls += 1
        params = dict(params)
        check_budgetable(params)
        schema = await acheck_subquery_schema(params.pop("schema")) if "schema" in params else None
        oversized = self._oversized(prompt)
        if oversized is not None:
            raise oversized
        if run.depth + 1 < run.rlm.max_depth:
            return await self._child(prompt, schema)
        if schema is not None:
            return await structured_query(self._send, prompt, schema, params, run.rlm.sub_client)
        return await self._send(prompt, params, cached)

    async def _send(self, prompt: Any, params: dict[str, Any],
                    cached: list[bool] | None = None) -> str:
        run = self._run
        client = run.rlm.sub_client
        request = client.request(prompt, **{"model": run.rlm.recursive_model, **params})
        try:
            return await client.send(request, meter=run.sub_meter, ledger=run.ledger,
                                     cached=cached)
        except LLMError as exc:
            raise self._window_error(prompt, exc) from exc

    def _oversized(self, prompt: Any) -> LLMError | None:
        """The error for a prompt larger than the sub-model's window (never sent)."""
        window = self._run.rlm.sub_window_chars
        chars = _prompt_chars(prompt)
        if chars <= window:
            return None
        return LLMError(prompts.sub_window_error(chars, window))

    def _window_error(self, prompt: Any, exc: LLMError) -> LLMError:
        """A server's context-length refusal, said the way the prompt promises."""
        if not _is_context_length_error(exc):
            return exc
        return LLMError(prompts.sub_window_error(_prompt_chars(prompt), self._run.rlm.sub_window_chars),
                        status=exc.status, attempts=exc.attempts)

    async def batch(self, prompts: list[str], params: dict[str, Any]) -> list[Any]:
        cached = [False] * len(prompts)
        with self._run.tracking():
            replies = await self._batch(prompts, params, cached)
        self._record(prompts, replies, cached)
        return replies

    async def _batch(self, prompts: list[str], params: dict[str, Any],
                     cached: list[bool]) -> list[Any]:
        run = self._run
        run.sub_calls += len(prompts)
        # Oversized prompts are answered here and never sent; the rest go out as one batch.
        refused = {i: err for i, p in enumerate(prompts) if (err := self._oversized(p)) is not None}
        if refused:
            kept = [i for i in range(len(prompts)) if i not in refused]
            marks = [False] * len(kept)
            sendable = [prompts[i] for i in kept]
            sent = iter(await self._send_batch(sendable, params, marks) if sendable else [])
            for i, hit in zip(kept, marks, strict=True):
                cached[i] = hit
            return [failed_slot(refused[i]) if i in refused else next(sent) for i in range(len(prompts))]
        return await self._send_batch(prompts, params, cached)

    async def _send_batch(self, prompts: list[str], params: dict[str, Any],
                          cached: list[bool]) -> list[str]:
        run = self._run
        total = len(prompts)
        params = dict(params)
        check_budgetable(params)
        schema = await acheck_subquery_schema(params.pop("schema")) if "schema" in params else None
        if run.depth + 1 < run.rlm.max_depth:
            results = await asyncio.gather(
                *(self._child(p, schema) for p in prompts), return_exceptions=True
            )
        elif schema is not None:
            results = await structured_batch(
                self._send, self._send_many, prompts, schema, params, run.rlm.sub_client,
                self._progress(total),
            )
        else:
            results = await self._send_many(prompts, params, self._progress(total), cached)
        return [
            failed_slot(self._window_error(p, r) if isinstance(r, LLMError) else r)
            for p, r in zip(prompts, results, strict=True)
        ]

    async def _send_many(self, prompts: list[Any], params: dict[str, Any],
                         on_item_done: Callable[[int, int], None],
                         cached: list[bool] | None = None) -> list[Any]:
        run = self._run
        client = run.rlm.sub_client
        params = {"model": run.rlm.recursive_model, **params}
        requests = [client.request(p, **params) for p in prompts]
        return await client.send_many(
            requests, meter=run.sub_meter, ledger=run.ledger, on_item_done=on_item_done,
            cached=cached,
        )

    def _progress(self, total: int) -> Callable[[int, int], None]:
        step = max(1, total // 50)
        emit = self._run.trajectory.emit

        def progress(done: int, total_: int) -> None:
            if done == total_ or done % step == 0:
                emit("subcalls", done=done, total=total_)

        return progress

    async def _child(self, prompt: str, schema: Schema | None = None) -> Any:
        run = self._run
        child = await run.run_child(
            context=prompt, query=prompts.CHILD_QUERY, depth=run.depth + 1, parent=run,
            schema=schema,
        )
        if child.answer is None:
            raise LLMError(f"the child RLM found no answer ({child.error or child.stopped_reason})")
        return child.answer if schema is None else schema.to_json(child.output)


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in prompt if isinstance(prompt, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return total


def _is_context_length_error(exc: BaseException) -> bool:
    # Servers word it differently: OpenAI "context_length_exceeded" / "maximum context
    # length", vLLM "longer than the maximum model length", llama.cpp "exceeds the
    # available context size".
    if not isinstance(exc, LLMError) or exc.status not in (400, 413, 422):
        return False
    text = str(exc).lower()
    return any(
        marker in text
        for marker in ("context length", "context_length", "context window", "maximum model length",
                       "context size", "too many tokens", "prompt is too long")
    )


def _estimate_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    # About 4 characters a token for English text and code; a few tokens per message.
    return sum(len(str(m.get("content") or "")) for m in messages) // 4 + 4 * len(messages)


# How long an interrupted run may take to stop its cell and write its record.
INTERRUPT_GRACE_S = 15.0


def _deadline_passed(run: _Run) -> None:
    ledger = run.ledger
    ledger.time_up()  # this run's deadline, or an earlier one of the job it belongs to
    run.halt("budget", ledger.describe())


def _emit_cell_result(run: _Run, iteration: int, index: int, result: ExecResult,
                      cached_sub_calls: int = 0) -> None:
    run.trajectory.emit(
        "cell_result",
        iteration=iteration,
        index=index,
        stdout=result.stdout,
        stderr=result.stderr,
        error=result.error,
        final=result.final,
        duration_s=round(result.duration_s, 4),
        sub_calls=result.sub_calls,
        cached_sub_calls=cached_sub_calls,
        truncated=result.truncated,
    )


def _short_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class RLM:
    """A Recursive Language Model: a root model driving a sandboxed REPL over the context.

    Models and endpoint:

    - ``model``: the root model, which writes the code (default: $RLM_MODEL, else
      gpt-4o-mini).
    - ``recursive_model``: what ``llm_query`` calls (default: ``model``).
    - ``base_url``: an OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI).
    - ``api_key``: its key (default: $OPENAI_API_KEY). With no key at all the
      constructor raises ``ConfigError``; a local server that needs none takes any value.
    - ``client`` / ``sub_client``: ready ``AsyncOpenAIClient``s to use (and share
      between RLMs) instead of building them; they are not closed by ``close()``.
    - ``max_concurrency``: sub-queries in flight at once on the sub client this RLM
      builds (default 64; ignored when ``sub_client`` is given).
    - ``prices``: model name to USD per 1M (input, output) tokens for the clients this
      RLM builds, so costs and ``max_cost_usd`` work for models the built-in table
      does not know (default: the built-in table and $RLM_PRICES).

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
      or "none" (only counts).
    - ``verbose``: show each iteration live in the terminal or notebook (default False).
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
        max_concurrency: int = 64,
        cell_timeout: float = 60.0,
        sub_window_chars: int = DEFAULT_SUB_WINDOW_CHARS,
        prices: Mapping[str, tuple[float, float]] | None = None,
        cache: Any = None,
        cache_read: bool = True,
        cache_write: bool = True,
        reuse_workers: bool = True,
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
        if (cache not in (None, False) or not cache_read or not cache_write) and (
            client is not None or sub_client is not None
        ):
            raise ConfigError(
                "cache=, cache_read= and cache_write= apply to the clients RLM creates; "
                "pass them to the AsyncOpenAIClient(s) you pass in instead"
            )
        # One store for both clients this RLM creates; it is closed after them.
        self._cache = open_cache(cache)
        caching = {"cache": self._cache, "cache_read": cache_read, "cache_write": cache_write}
        self._owned: list[AsyncOpenAIClient] = []
        if client is None:
            client = AsyncOpenAIClient(model=model, api_key=api_key, base_url=base_url,
                                       prices=prices, **caching)
            self._owned.append(client)
        # A missing key fails here, once, not as N failed results after N sandboxes started.
        client.check_key()
        self.client = client
        self.model = model or client.model
        self.recursive_model = recursive_model or self.model
        if sub_client is None:
            sub_client = AsyncOpenAIClient(
                model=self.recursive_model,
                api_key=api_key,
                base_url=base_url or client.base_url,
                max_concurrency=max_concurrency,
                prices=prices,
                **caching,
            )
            self._owned.append(sub_client)
        sub_client.check_key()
        self.sub_client = sub_client
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
        self._active: set[_Run] = set()
        self._active_lock = threading.Lock()
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
        settings["base_url"] = settings.get("base_url") or self.client.base_url
        if settings.get("api_key") is None:
            settings["api_key"] = os.environ.get("OPENAI_API_KEY")
        settings["model"] = self.model
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

    def _system_prompt_for(self, env: REPLEnv) -> str:
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
                return await self._run(context=context, query=query, depth=0, schema=typed,
                                       on_end=ended.append)
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
        return await self._run(context=context, query=query, depth=0, schema=typed, env=env,
                               history=history)

    @property
    def worker_pool(self) -> WorkerPool | None:
        """The pool of reset process-sandbox workers this RLM's runs share (None with
        ``sandbox="local"`` or ``reuse_workers=False``); ``stats()`` shows its counts."""
        return self._worker_pool

    def new_env(self, context: Any) -> REPLEnv:
        """A REPLEnv holding ``context``, configured like this RLM's runs (sandbox, cell
        timeout, output cap, tools); pass it to ``acompletion(env=...)`` to keep
        variables across runs. The caller closes it."""
        return self._new_env(context)

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
                    result = await self._run(context=context, query=query, depth=0, schema=typed)
                except Exception as exc:  # noqa: BLE001 - one task's failure is its own
                    result = RLMResult(answer=None, stopped_reason="error", error=_short_error(exc))
            if bar is not None:
                bar.advance(result.error is None)
            return result

        try:
            return list(await asyncio.gather(*(one(c, q, t) for c, q, t in items)))
        finally:
            if bar is not None:
                bar.stop()

    def run_job(self, tasks: Any, out: str | Path, **options: Any) -> JobSummary:
        """Run a many-document job: every task not yet in ``out`` is run and appended to it.

        ``tasks`` is a JSONL or CSV file, a directory of documents (with ``query=``), or
        an iterable of ``rlm.jobs.Task`` or mappings ``{"id", "query", "context" |
        "context_path"}``. Each finished task is one fsynced line of ``out``; running
        the same job again skips ids already there (``retry_failed=True`` re-runs those
        that ended in error). Options: ``query``, ``fmt``, ``encoding``,
        ``concurrency`` (8), job caps ``max_cost_usd``/``max_tokens``/``max_time_s``
        (binding per model call on the local backend), ``schema`` (a typed answer per
        task, in each line's ``output``), ``sort_output``, ``progress``, ``backend``
        ("local" or "ray") and ``ray_address``. The sub-query cache is this RLM's
        ``cache=``. Returns a ``JobSummary``; see the README's "Jobs" section.
        """
        from rlm.jobs.runner import run_job

        return run_job(self, tasks, out, **options)

    async def arun_job(self, tasks: Any, out: str | Path, **options: Any) -> JobSummary:
        """``run_job`` for async code: the job's tasks run on the caller's event loop."""
        from rlm.jobs.runner import arun_job

        return await arun_job(self, tasks, out, **options)

    def load_session(self, path: str | Path, context: Any) -> RLMSession:
        """A session over ``context`` that continues one saved with ``RLMSession.save``:
        the questions and answers, the usage so far and the saved variables are back."""
        from rlm.session_store import load_session

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
        with self._active_lock:
            runs = list(self._active)
        for run in runs:
            run.halt("interrupted", reason)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)

    async def aclose(self) -> None:
        """Interrupt runs still going (they end "interrupted"), then close the clients this
        RLM created (not ones passed in)."""
        self.interrupt("the RLM was closed")
        if self._active:
            await asyncio.to_thread(self._wait_idle, INTERRUPT_GRACE_S)
        for c in self._owned:
            await c.close()
        self._close_stores()

    def close(self) -> None:
        """``aclose`` for sync code."""
        self.interrupt("the RLM was closed")
        if not engine.in_engine_thread():
            self._wait_idle(INTERRUPT_GRACE_S)
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

    # -- the loop ---------------------------------------------------------------------

    def _trajectory(self, depth: int, parent: _Run | None) -> Trajectory:
        sinks: list[Callable[[dict[str, Any]], None]] = []
        if parent is not None:
            sinks = list(parent.trajectory.sinks)
        else:
            if self.verbose:
                from rlm.display import LiveDisplay

                sinks.append(LiveDisplay())
            if self.on_event is not None:
                sinks.append(self.on_event)
        log_dir = self.log_dir if depth == 0 else None
        trajectory = Trajectory(log_dir=log_dir, depth=depth, sinks=sinks)
        if parent is not None:
            # A child's events also land in the parent's log, so one file tells all.
            parent_traj = parent.trajectory

            def forward(event: dict[str, Any]) -> None:
                fields = {
                    k: v for k, v in event.items() if k not in ("type", "t", "run_id", "child_run")
                }
                # A grandchild's event already names its run: keep the deepest one.
                parent_traj.emit(
                    event["type"], child_run=event.get("child_run") or event["run_id"], **fields
                )

            trajectory.sinks = [forward]
        return trajectory

    async def _run(
        self,
        *,
        context: Any,
        query: str,
        depth: int,
        parent: _Run | None = None,
        env: REPLEnv | None = None,
        history: Sequence[tuple[str, str]] = (),
        schema: Schema | None = None,
        on_end: Callable[[RLMResult], None] | None = None,
    ) -> RLMResult:
        trajectory = self._trajectory(depth, parent)
        if parent is not None:
            ledger = parent.ledger  # children spend from what is left
        else:
            ledger = BudgetLedger(
                max_tokens=self.max_tokens,
                max_cost_usd=self.max_cost_usd,
                max_time_s=self.max_time_s,
                prices={**self.client.prices, **self.sub_client.prices, **self.prices},
                parent=outer_budget(),  # a job's ledger, when this run is one of its tasks
            )
        run = _Run(self, depth, trajectory, self._run, ledger)
        if parent is not None:
            parent.children.append(run)
        own_env = env is None
        answer: str | None = None
        stopped = "error"
        error: str | None = None
        iterations = 0
        cancelled = False
        typed = _TypedAnswer(schema, self.max_answer_retries) if schema is not None else None
        timer: asyncio.TimerHandle | None = None
        if parent is None:
            with self._active_lock:
                self._active.add(run)
            remaining = ledger.remaining_s()
            if remaining is not None:
                timer = asyncio.get_running_loop().call_later(
                    max(0.0, remaining), _deadline_passed, run
                )
        try:
            description = describe_context(context)
            trajectory.emit(
                "run_start",
                query=query,
                context=description,
                model=self.model,
                recursive_model=self.recursive_model,
                sandbox=self.sandbox,
                # A child's context is the prompt its parent sent: show that, not the
                # generic child instruction in ``query``.
                **({"prompt": self._recorded(prompt_text(context))}
                   if depth and self.record_subcalls != "none" else {}),
                max_iterations=self.max_iterations,
                max_depth=self.max_depth,
                schema=schema.json_schema if schema is not None else None,
                tools=sorted(self.tools),
            )
            if env is None:
                # Starting (and closing) an env may block on a worker; keep the loop free.
                env = await asyncio.to_thread(self._new_env, context, _SubQueryService(run))
            else:
                env.set_sub_queries(_SubQueryService(run))
            run.env = env
            run.check_stop()
            answer, stopped, iterations = await self._loop(run, env, description, query, history, typed)
            if stopped == "invalid_answer" and typed is not None:
                error = typed.error_text()
        except _Stopped as exc:
            stopped, error = exc.kind, str(exc)
        except BudgetExhaustedError:
            stopped, error = "budget", ledger.describe()
        except asyncio.CancelledError:
            # Cancelled from outside (task.cancel, Ctrl-C through run_sync): write the
            # record, then let the cancellation go on.
            cancelled = True
            run.halt("interrupted", "the run was interrupted")
            assert run.halted is not None
            stopped, error = run.halted.kind, str(run.halted)
        except Exception as exc:  # noqa: BLE001 - a run never raises; the result says why
            if run.halted is not None:  # e.g. the client closed under a halted run
                stopped, error = run.halted.kind, str(run.halted)
            else:
                stopped, error = "error", _short_error(exc)
        finally:
            if timer is not None:
                timer.cancel()
            if own_env and env is not None:
                await asyncio.to_thread(env.close)
        if stopped in ("budget", "interrupted"):
            trajectory.emit(stopped, reason=error)
        elif stopped == "error":
            trajectory.emit("error", message=error)
        usage = run.usage()
        result = RLMResult(
            answer=answer,
            iterations=iterations or run.iterations,
            elapsed_s=time.monotonic() - run.started,
            usage=usage,
            sub_calls=run.total_sub_calls(),
            stopped_reason=stopped,
            error=error,
            trajectory=trajectory.events,
            log_path=str(trajectory.log_path) if trajectory.log_path else None,
        )
        if typed is not None:
            result.output = typed.output if answer is not None else None
            if stopped == "invalid_answer":
                result.raw_output = typed.raw
                result.validation_errors = [i.to_dict() for i in typed.issues]
        trajectory.emit(
            "run_end",
            answer=answer,
            stopped_reason=stopped,
            iterations=result.iterations,
            elapsed_s=round(result.elapsed_s, 3),
            sub_calls=result.sub_calls,
            usage={k: v.to_dict() for k, v in usage.items()},
            error=error,
        )
        trajectory.close()
        if parent is None:
            with self._active_lock:
                self._active.discard(run)
        if on_end is not None:
            on_end(result)
        if cancelled:
            raise asyncio.CancelledError
        return result

    def _recorded(self, text: str) -> str:
        return text if self.record_subcalls == "full" else cap_text(text, SUBCALL_CAP_CHARS)

    def _new_env(self, context: Any, sub_queries: _SubQueryService | None = None) -> REPLEnv:
        pooled = {"worker_pool": self._worker_pool} if self._worker_pool is not None else {}
        return REPLEnv(
            context=context,
            sandbox=self.sandbox,
            timeout=self.cell_timeout,
            max_output_chars=self.max_output_chars,
            tools=self.tools or None,
            sub_queries=sub_queries,
            **pooled,
        )

    async def _root_turn(self, run: _Run, messages: list[dict[str, Any]], iteration: int,
                         new: list[dict[str, Any]]) -> str:
        run.trajectory.emit("root_request", iteration=iteration, messages=new)
        before = run.root_meter.snapshot()
        started = time.monotonic()
        client = self.client
        reply = await client.send(client.request(messages, model=self.model), meter=run.root_meter,
                                  ledger=run.ledger)
        turn = run.root_meter.snapshot() - before
        run.trajectory.emit(
            "root_reply",
            iteration=iteration,
            content=reply,
            usage={
                "prompt_tokens": turn.prompt_tokens,
                "completion_tokens": turn.completion_tokens,
                "cost_usd": turn.cost_usd if not turn.unpriced_models else "unpriced",
            },
            elapsed_s=round(time.monotonic() - started, 3),
            cached=turn.cached_calls > 0,
        )
        return reply

    async def _loop(
        self,
        run: _Run,
        env: REPLEnv,
        description: str,
        query: str,
        history: Sequence[tuple[str, str]],
        typed: _TypedAnswer | None = None,
    ) -> tuple[str | None, str, int]:
        first = prompts.FIRST_USER_TEMPLATE.format(description=description, query=query)
        if history:
            lines = "\n".join(f"- Q: {q}\n  A: {a}" for q, a in history)
            first = prompts.HISTORY_TEMPLATE.format(history=lines) + "\n" + first
        system = self._system_prompt_for(env)
        if typed is not None:
            system += prompts.SCHEMA_SECTION.format(schema=typed.schema.prompt_text())
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": first},
        ]
        new = messages[:]
        for iteration in range(1, self.max_iterations + 1):
            run.iterations = iteration
            run.check_stop()
            messages = await self._maybe_compact(run, messages, iteration)
            reply = await self._root_turn(run, messages, iteration, new)
            messages.append({"role": "assistant", "content": reply})
            run.check_stop()
            blocks = find_code_blocks(reply)
            if not blocks:
                final = await self._final_from_text(run, env, reply)
                if final is not None:
                    verdict, feedback = await self._judge(run, typed, final, iteration)
                    if verdict == "answer":
                        return _answer_text(final, typed), "final", iteration
                    if verdict == "invalid":
                        return None, "invalid_answer", iteration
                    new = [{"role": "user", "content": feedback}]
                    messages.extend(new)
                    continue
                new = [{"role": "user", "content": prompts.NO_CODE_TEMPLATE}]
                messages.extend(new)
                continue
            outputs: list[str] = []
            for index, code in enumerate(blocks):
                result = await self._cell(run, env, iteration, index, code)
                feedback = ""
                if result.final is not None:
                    run.trajectory.emit("final", answer=result.final, source="code")
                    verdict, feedback = await self._judge(run, typed, result.final, iteration)
                    if verdict == "answer":
                        return _answer_text(result.final, typed), "final", iteration
                    if verdict == "invalid":
                        return None, "invalid_answer", iteration
                outputs.append(
                    prompts.format_cell_output(
                        index, result.stdout, result.stderr, result.error, self.max_output_chars
                    )
                )
                run.check_stop()
                if feedback:
                    # The rest of this reply was written for an answer that was refused.
                    outputs.append(feedback)
                    break
            new = [
                {"role": "user", "content": prompts.NEXT_USER_TEMPLATE.format(outputs="\n\n".join(outputs))}
            ]
            messages.extend(new)
        # Out of iterations: one last turn asks for the answer.
        new = [{"role": "user", "content": prompts.LAST_TURN_PROMPT}]
        messages.extend(new)
        run.check_stop()
        reply = await self._root_turn(run, messages, self.max_iterations + 1, new)
        final = await self._final_from_text(run, env, reply)
        if final is None:
            final = reply.strip()
            run.trajectory.emit("final", answer=final, source="last_turn")
        if typed is not None:
            # No turn is left to fix a mismatch: it ends the run.
            if (await self._judge(run, typed, final, self.max_iterations + 1, last=True))[0] != "answer":
                return None, "invalid_answer", self.max_iterations
            return typed.answer, "max_iterations", self.max_iterations
        return _answer_text(final, None), "max_iterations", self.max_iterations

    async def _judge(
        self, run: _Run, typed: _TypedAnswer | None, value: Any, iteration: int, last: bool = False
    ) -> tuple[str, str]:
        """What a FINAL value means for the run: ("answer", ""), ("retry", the feedback
        for the root) or ("invalid", "") when no retry is left."""
        if typed is None or await typed.accept(value):
            return "answer", ""
        left = 0 if last else typed.retries_left()
        run.trajectory.emit(
            "answer_invalid",
            iteration=iteration,
            attempt=typed.failures,
            retries_left=left,
            errors=[i.to_dict() for i in typed.issues],
        )
        if left <= 0:
            return "invalid", ""
        return "retry", prompts.INVALID_ANSWER_TEMPLATE.format(
            issues=format_issues(typed.issues), left=left, plural="s" if left != 1 else ""
        )

    async def _maybe_compact(
        self, run: _Run, messages: list[dict[str, Any]], iteration: int
    ) -> list[dict[str, Any]]:
        """Replace older turns by a root-written summary once the conversation is too long.

        The system prompt, the first user message (description and query) and the last
        reply with its output stay verbatim; the summary joins the first user message so
        roles still alternate. The REPL is untouched, so variables named in the summary
        still hold their values.
        """
        limit = self.root_window_tokens
        if limit is None or len(messages) <= 2 + _KEEP_RECENT:
            return messages
        before = _estimate_tokens(messages)
        if before <= limit:
            return messages
        head, recent = messages[:2], messages[-_KEEP_RECENT:]
        request = [*messages[:-_KEEP_RECENT], {"role": "user", "content": prompts.COMPACTION_PROMPT}]
        usage_before = run.root_meter.snapshot()
        client = self.client
        summary = await client.send(client.request(request, model=self.model), meter=run.root_meter,
                                    ledger=run.ledger)
        spent = run.root_meter.snapshot() - usage_before
        first = dict(head[1])
        first["content"] = (
            f"{head[1]['content']}\n\n{prompts.COMPACTED_TEMPLATE.format(summary=summary.strip())}"
        )
        compacted = [head[0], first, *recent]
        run.trajectory.emit(
            "compaction",
            iteration=iteration,
            messages_before=len(messages),
            messages_after=len(compacted),
            tokens_before=before,
            tokens_after=_estimate_tokens(compacted),
            summary=summary,
            usage={
                "prompt_tokens": spent.prompt_tokens,
                "completion_tokens": spent.completion_tokens,
                "cost_usd": spent.cost_usd if not spent.unpriced_models else "unpriced",
            },
        )
        return compacted

    async def _cell(self, run: _Run, env: REPLEnv, iteration: int, index: int,
                    code: str) -> ExecResult:
        """Run one cell and record it; an interruption still records what it printed."""
        run.trajectory.emit("cell", iteration=iteration, index=index, code=code)
        cached_before = run.sub_meter.snapshot().cached_calls
        # Shielded, so a cancelled run can stop the cell and still read its output.
        task = asyncio.ensure_future(env.aexecute(code))
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            run.halt("interrupted", "the run was interrupted")
            with contextlib.suppress(BaseException):
                _emit_cell_result(run, iteration, index,
                                  await asyncio.wait_for(asyncio.shield(task), INTERRUPT_GRACE_S))
            raise
        _emit_cell_result(run, iteration, index, result,
                          run.sub_meter.snapshot().cached_calls - cached_before)
        if env.closed:
            raise _Stopped("interrupted", "the REPL was closed during the run")
        return result

    async def _final_from_text(self, run: _Run, env: REPLEnv, reply: str) -> Any:
        found = find_final_in_text(reply)
        if found is None:
            return None
        if found.kind == "FINAL":
            run.trajectory.emit("final", answer=found.value, source="text")
            return found.value
        result = await env.aexecute(f"FINAL_VAR({found.value!r})")
        if result.final is not None:
            run.trajectory.emit("final", answer=result.final, source="text FINAL_VAR")
            return result.final
        return None


class _TypedAnswer:
    """One run's typed answer: the schema, the attempts so far and the last verdict."""

    def __init__(self, schema: Schema, max_retries: int) -> None:
        self.schema = schema
        self.max_retries = max_retries
        self.failures = 0
        self.raw: Any = None
        self.output: Any = None
        self.answer: str | None = None
        self.issues: tuple[SchemaIssue, ...] = ()

    async def accept(self, value: Any) -> bool:
        """Validate a FINAL value (in a validation thread: the loop stays free); on
        success keep the output and its answer text."""
        self.raw = value
        verdict = await self.schema.avalidate_answer(value)
        if verdict.ok:
            self.output = verdict.output
            self.answer = verdict.output if isinstance(verdict.output, str) else self.schema.dumps(verdict.output)
            self.issues = ()
            return True
        self.failures += 1
        self.issues = verdict.issues
        return False

    def retries_left(self) -> int:
        return self.max_retries - self.failures + 1

    def error_text(self) -> str:
        first = str(self.issues[0]) if self.issues else "no value"
        tries = self.failures
        return (
            f"the answer did not match the schema after {tries} attempt{'s' if tries != 1 else ''} "
            f"({first}); the last value is in raw_output, the issues in validation_errors"
        )


class RLMSession:
    """Multi-turn work over one context: one REPLEnv kept across ``ask`` calls.

    Each ask is a fresh root conversation that is told the earlier questions and
    answers; the REPL keeps every variable, so later asks build on earlier work.
    """

    def __init__(self, rlm: RLM, context: Any) -> None:
        self.rlm = rlm
        self.context = context
        self.history: list[tuple[str, str]] = []
        # Usage of every ask so far (kept across save/load), and the names the session's
        # cells assigned: what ``save`` looks for in the REPL.
        self.usage: dict[str, Usage] = {"root": Usage(), "sub": Usage()}
        self.variable_names: set[str] = set()
        # Each ask gives the env that run's sub-query service.
        self.env = rlm.new_env(context)

    def ask(self, query: str, schema: Any = None) -> RLMResult:
        """Ask the next question (sync; works inside a running loop too); ``schema`` as
        for ``RLM.completion``."""
        return engine.run_sync(self.aask(query, schema=schema))

    async def aask(self, query: str, schema: Any = None) -> RLMResult:
        """Ask the next question; ``schema`` asks for a typed answer."""
        _check_query(query)
        result = await self.rlm.acompletion(
            self.context, query, schema, env=self.env, history=self.history
        )
        if result.answer is not None:
            self.history.append((query, result.answer))
        self.usage = {k: self.usage[k] + result.usage[k] for k in ("root", "sub")}
        from rlm.session_store import assigned_names

        for event in result.trajectory:
            if event.get("type") == "cell" and "child_run" not in event:
                self.variable_names |= assigned_names(event.get("code") or "")
        return result

    def save(self, path: str | Path) -> Path:
        """Save the history, the usage and the plain-data REPL variables to ``path`` (JSON).

        Variables that are not plain data (str, numbers, bool, None and lists, tuples,
        dicts and sets of them, each within 1,000,000 characters of JSON) are listed in
        the file's ``not_saved`` with the reason. ``RLM.load_session`` reads it back.
        """
        from rlm.session_store import save_session

        return save_session(self, path)

    def close(self) -> None:
        """Close the session's REPL."""
        self.env.close()

    def __enter__(self) -> RLMSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answer_text(value: Any, typed: _TypedAnswer | None) -> str:
    """RLMResult.answer for a FINAL value: the validated output's text with a schema;
    without one, a str as is and other plain data as JSON."""
    if typed is not None:
        assert typed.answer is not None
        return typed.answer
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _reply_text(reply: Any) -> str:
    # A typed sub-query's reply is the parsed value; the log keeps it as JSON text.
    if isinstance(reply, str):
        return reply
    try:
        return json.dumps(reply, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(reply)


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

