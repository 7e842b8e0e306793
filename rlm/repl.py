"""REPLEnv: a persistent, sandboxed Python REPL with the context, llm_query and FINAL.

A root model works here: ``context`` is a variable (the caller's object itself, never
copied), sub-queries go through ``llm_query``/``llm_query_batch`` and their async forms,
and the answer comes back through ``FINAL``/``FINAL_VAR``. Cells run under the sandbox
policy (``rlm.sandbox``) in an executor: ``"local"`` (a worker thread of this process,
soft limits, fastest) or ``"process"`` (a worker process with OS limits).

A list or dict context is shared, not copied: code in the env can change it in place
and the caller sees those changes (copying would double the memory of a large context;
pass a copy if that matters). Rebinding the name ``context`` in a cell is undone when
the cell ends, like every reserved name.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlm import loop as engine
from rlm.errors import ConfigError, EnvClosedError, LLMError, LoopError
from rlm.sandbox import CellOutcome, Executor, SubQueries
from rlm.sandbox.flow import SubQueryGate, SubQueryLimits
from rlm.sandbox.subqueries import FAILED_SLOT_PREFIX, LLMQueryError
from rlm.structured import acheck_subquery_schema, structured_batch, structured_query
from rlm.usage import BudgetLedger, check_budgetable

__all__ = ["ClientSubQueries", "ExecResult", "REPLEnv", "describe_context"]

_SANDBOXES = ("local", "process")
_LOCAL_OPTIONS = frozenset({"grace_s"})
_PROCESS_OPTIONS = frozenset(
    {"memory_limit_mb", "cpu_limit_s", "file_limit_mb", "disk_limit_mb", "max_open_files",
     "max_processes", "start_timeout", "worker_pool"}
)  # fmt: skip


@dataclass
class ExecResult:
    """The outcome of one cell.

    ``stdout``/``stderr`` hold what the cell printed (capped at ``max_output_chars`` each,
    head and tail kept, ``truncated`` set when cut); ``error`` is None or the text the
    model reads (a traceback of its own lines, a policy message, a timeout);
    ``final`` is the answer given to FINAL/FINAL_VAR in this cell or None: a str, or
    JSON-compatible data (dict, list, number, bool) as plain builtin types, copied out
    of the sandbox without running any of the cell's code (anything else arrives as
    its ``str()``);
    ``duration_s`` the wall time; ``sub_calls`` how many sub-queries the cell made.
    """

    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    final: Any = None
    duration_s: float = 0.0
    sub_calls: int = 0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the cell ran without an error."""
        return self.error is None

    def __repr__(self) -> str:
        bits = [f"{self.duration_s * 1000:.1f} ms" if self.duration_s < 1 else f"{self.duration_s:.2f} s"]
        if self.error is not None:
            last = self.error.strip().splitlines()[-1] if self.error.strip() else "error"
            bits.append(f"error={_clip(last, 80)!r}")
        if self.stdout:
            bits.append(f"stdout={_clip(self.stdout, 60)!r}")
        if self.stderr:
            bits.append(f"stderr={_clip(self.stderr, 40)!r}")
        if self.final is not None:
            shown = self.final if isinstance(self.final, str) else repr(self.final)
            bits.append(f"final={_clip(shown, 60)!r}")
        if self.sub_calls:
            bits.append(f"sub_calls={self.sub_calls}")
        if self.truncated:
            bits.append("truncated")
        return f"ExecResult({', '.join(bits)})"

    def _repr_html_(self) -> str:
        from rlm.display import exec_result_html

        return exec_result_html(self)

    def __rich__(self) -> Any:
        from rlm.display import exec_result_rich

        return exec_result_rich(self)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class ClientSubQueries:
    """The ``SubQueries`` service over one ``AsyncOpenAIClient`` (both executors use it).

    ``query`` returns the reply or raises the client's ``LLMError``; ``batch`` never
    raises for an item: a sub-query still failing after the client's retries becomes
    ``"[llm_query error: <short message>]"`` in its slot. With a ``schema`` parameter
    (a JSON Schema dict) replies are parsed and validated (``rlm.structured``). With a
    ``ledger`` every call reserves against that budget first (``rlm.usage``);
    ``progress(done, total)``, when set, hears each batch's items finish.
    """

    def __init__(self, client: Any, ledger: BudgetLedger | None = None) -> None:
        self._client = client
        self._ledger = ledger
        self.progress: Callable[[int, int], None] | None = None

    async def query(self, prompt: str, params: dict[str, Any]) -> Any:
        """One completion through the client."""
        check_budgetable(params)
        if "schema" in params:
            params = dict(params)
            schema = await acheck_subquery_schema(params.pop("schema"))
            return await structured_query(self._send, prompt, schema, params, self._client)
        return await self._send(prompt, params)

    async def batch(self, prompts: list[str], params: dict[str, Any]) -> list[Any]:
        """Many completions, concurrently through the client's limiter, in order."""
        check_budgetable(params)
        if "schema" in params:
            params = dict(params)
            schema = await acheck_subquery_schema(params.pop("schema"))
            results = await structured_batch(
                self._send, self._send_many, prompts, schema, params, self._client, self.progress
            )
        else:
            results = await self._send_many(prompts, params, self.progress)
        return [failed_slot(r) for r in results]

    async def _send(self, messages: Any, params: dict[str, Any]) -> str:
        return await self._client.send(self._client.request(messages, **params), ledger=self._ledger)

    async def _send_many(self, prompts: list[Any], params: dict[str, Any],
                         on_item_done: Callable[[int, int], None] | None) -> list[Any]:
        requests = [self._client.request(p, **params) for p in prompts]
        return await self._client.send_many(requests, ledger=self._ledger, on_item_done=on_item_done)


def _short_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, LLMError):
        text = f"{type(exc).__name__}: {text}"
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def failed_slot(result: Any) -> Any:
    """A batch item as REPL code sees it: the reply, or ``[llm_query error: ...]``.

    One spelling for every place that turns a failed sub-query into its slot's text
    (the REPL's service, the RLM's service, ``rlm repl``), so code and prompts can rely
    on the prefix. A structured sub-query's value (a dict, list...) passes unchanged.
    """
    if not isinstance(result, BaseException):
        return result
    return f"{FAILED_SLOT_PREFIX}{_short_error(result)}]"


class _CountingSubQueries:
    """What the executor is given: counts sub-queries and lets the env swap the service."""

    def __init__(self, inner: SubQueries | None) -> None:
        self.inner = inner
        self.calls = 0

    def _service(self) -> SubQueries:
        inner = self.inner
        if inner is None:
            raise LLMQueryError(
                "no model client is configured for this REPL, so llm_query cannot run: "
                "create it with REPLEnv(context, client=AsyncOpenAIClient(...))"
            )
        return inner

    async def query(self, prompt: str, params: dict[str, Any]) -> str:
        service = self._service()
        self.calls += 1
        return await service.query(prompt, params)

    async def batch(self, prompts: list[str], params: dict[str, Any]) -> list[str]:
        service = self._service()
        self.calls += len(prompts)
        return await service.batch(prompts, params)


def default_sandbox() -> str:
    """The sandbox ``REPLEnv`` and ``RLM`` use when none is named: "process" where the
    worker-process sandbox works (it needs fork and OS limits: Linux and macOS), else
    "local"."""
    return "process" if sys.platform.startswith(("linux", "darwin")) else "local"


class REPLEnv:
    """A persistent sandboxed REPL holding ``context``; see the module docstring.

    - ``context``: the value code sees as ``context`` (default None); in-process it is
      the caller's object itself, not a copy.
    - ``client``: an ``AsyncOpenAIClient`` that serves llm_query and friends; without
      one, calling them in a cell is an error in that cell. ``sub_queries`` may replace
      it with any ``SubQueries`` service.
    - ``sandbox``: "process" (a worker process with wall and CPU time, memory, network
      and file limits) or "local" (a worker thread of this process under the policy
      only: faster, weaker). Default: the same as ``RLM``'s, "process" on Linux and
      macOS, "local" elsewhere (``default_sandbox()``).
    - ``timeout``: wall-clock seconds one cell may run (default 30; None: no limit).
    - ``max_output_chars``: characters of stdout and of stderr kept per cell (default
      20,000).
    - ``setup_code``: Python run once at start (a failure raises ConfigError).
    - ``tools``: names mapped to functions the code may call.
    - ``max_batch_items`` (prompts per llm_query_batch call, default 100,000),
      ``max_prompt_bytes`` (UTF-8 bytes per prompt, default 4 MiB) and
      ``max_in_flight`` (this env's sub-queries running at once, default 1,024; a
      bigger batch is fed in as slots free up) keep one env from flooding the host;
      going past one is an error in the cell that names the option.
    - Options of the chosen sandbox (``memory_limit_mb``, ``cpu_limit_s``,
      ``disk_limit_mb``... for "process", ``grace_s`` for "local") pass through as
      keywords. ``worker_pool`` (process only, an ``rlm.sandbox.worker_pool.WorkerPool``)
      lends this REPL a warm, reset worker and takes it back on close; ``RLM`` does this
      for its own runs.

    Use ``sandbox="process"`` for untrusted input. The in-process sandbox enforces the
    same policy but shares the host process, so some things it cannot stop: a C-stack
    overflow from a deeply nested object hashed or iterated in C (a 10**6-deep tuple)
    crashes the host with SIGSEGV; one GIL-holding C call (``10**10**8``, a
    catastrophic regex) runs past the deadline until it returns; threads that C code
    starts keep running; and memory is the host's.
    """

    def __init__(
        self,
        context: Any = None,
        client: Any = None,
        *,
        sandbox: str | None = None,
        timeout: float | None = 30.0,
        max_output_chars: int = 20_000,
        setup_code: str | None = None,
        tools: dict[str, Any] | None = None,
        sub_queries: SubQueries | None = None,
        max_batch_items: int = SubQueryLimits.max_batch_items,
        max_prompt_bytes: int = SubQueryLimits.max_prompt_bytes,
        max_in_flight: int = SubQueryLimits.max_in_flight,
        **sandbox_options: Any,
    ) -> None:
        if sandbox is None:
            sandbox = default_sandbox()
        if sandbox not in _SANDBOXES:
            raise ConfigError(f"sandbox must be one of {', '.join(map(repr, _SANDBOXES))}, not {sandbox!r}")
        valid = _LOCAL_OPTIONS if sandbox == "local" else _PROCESS_OPTIONS
        unknown = sorted(set(sandbox_options) - valid)
        if unknown:
            names = ", ".join(sorted(valid))
            raise ConfigError(
                f"unknown REPLEnv option(s) {', '.join(map(repr, unknown))} for sandbox={sandbox!r}; "
                f"valid: context, client, sandbox, timeout, max_output_chars, setup_code, tools, "
                f"sub_queries, max_batch_items, max_prompt_bytes, max_in_flight, {names}"
            )
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        if not isinstance(max_output_chars, int) or max_output_chars < 100:
            raise ConfigError(f"max_output_chars must be an int of at least 100, not {max_output_chars!r}")
        if setup_code is not None and not isinstance(setup_code, str):
            raise ConfigError("setup_code must be a str of Python code")
        if tools is not None and not isinstance(tools, dict):
            raise ConfigError("tools must be a dict mapping names to functions")
        if client is not None and sub_queries is None:
            sub_queries = ClientSubQueries(client)
        self.sandbox = sandbox
        self.timeout = float(timeout) if timeout is not None else None
        self.max_output_chars = max_output_chars
        limits = SubQueryLimits(
            max_batch_items=max_batch_items,
            max_prompt_bytes=max_prompt_bytes,
            max_in_flight=max_in_flight,
        )
        self._limits = limits
        self._sub_queries = _CountingSubQueries(sub_queries)
        self._busy = _Busy()
        self._closed = False
        common = dict(
            context=context,
            # The env's caps sit in front of every sub-query, in both sandboxes.
            sub_queries=SubQueryGate(self._sub_queries, limits),
            setup_code=setup_code,
            tools=tools,
            max_output_chars=max_output_chars,
        )
        if sandbox == "local":
            from rlm.sandbox.local import LocalExecutor

            self._executor: Executor = LocalExecutor(**common, **sandbox_options)
        else:
            try:
                from rlm.sandbox.process import ProcessExecutor
            except ImportError as exc:
                raise ConfigError(
                    f"sandbox='process' is not available yet in this installation ({exc}); "
                    "use sandbox='local'"
                ) from exc
            self._executor = ProcessExecutor(**common, **sandbox_options)
        # Closing on garbage collection stops the worker even if the caller forgets.
        self._finalizer = weakref.finalize(self, self._executor.close)
        try:
            self._executor.start()
        except BaseException:
            self._finalizer()
            raise
        setup_error = getattr(self._executor, "setup_error", None)
        if setup_error:
            self._finalizer()
            raise ConfigError(f"setup_code failed, so the REPL was not created:\n{setup_error}")

    # -- running code ------------------------------------------------------------------

    def execute(self, code: str) -> ExecResult:
        """Run one cell and return its ExecResult; never raises for faults in the code.

        Works from any thread, including one whose event loop is running (a notebook
        cell, a web handler): it blocks that thread until the cell is done. Cells of
        one env run one at a time. Raises EnvClosedError after ``close()``.
        """
        self._check_open()
        if engine.in_engine_thread():
            raise LoopError(
                "REPLEnv.execute was called on rlm's engine loop thread, where the cell's "
                "sub-queries could never run; use `await env.aexecute(code)` there"
            )
        with self._busy.hold():
            before = self._sub_queries.calls
            started = time.perf_counter()
            outcome = self._executor.execute(code, self.timeout)
            return self._result(outcome, started, before)

    async def aexecute(self, code: str) -> ExecResult:
        """Run one cell from any event loop without blocking it; see ``execute``."""
        self._check_open()
        await self._busy.acquire_async()
        try:
            before = self._sub_queries.calls
            started = time.perf_counter()
            with engine.waking():
                outcome = await self._executor.aexecute(code, self.timeout)
            return self._result(outcome, started, before)
        finally:
            self._busy.release()

    def _result(self, outcome: CellOutcome, started: float, before: int) -> ExecResult:
        return ExecResult(
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            error=outcome.error,
            final=outcome.final,
            duration_s=time.perf_counter() - started,
            sub_calls=self._sub_queries.calls - before,
            truncated=outcome.truncated,
        )

    def get(self, name: str) -> Any:
        """Return the value of variable ``name`` in the REPL; KeyError if it is not defined.

        The local sandbox returns the object itself (``env.get("context") is context``);
        the process sandbox returns a JSON copy.
        """
        self._check_open()
        return self._executor.get(name)

    def interrupt(self, reason: str = "the cell was interrupted") -> None:
        """Stop the cell running now, from any thread; its ``execute``/``aexecute`` returns.

        The returned ExecResult holds what the cell printed before it stopped and an
        error naming ``reason``. Used for run deadlines and Ctrl-C; a no-op when idle.
        """
        if not self._closed:
            self._executor.interrupt(reason)

    def set_sub_queries(self, sub_queries: SubQueries | None) -> None:
        """Serve this env's llm_query family with ``sub_queries`` from the next call on.

        RLM sessions reuse one env across runs, each run with its own service (its own
        meters and budget).
        """
        self._sub_queries.inner = sub_queries

    @property
    def protections(self) -> dict[str, bool | str]:
        """Which OS-level protections this env's cells run under on this machine.

        For sandbox="process" see ``ProcessExecutor.protections`` (network namespace,
        PID namespace and ``kill_scope``, filesystem jail and ``disk_limit``, leased uid,
        each rlimit...); for "local" every OS key is False. ``subquery_caps`` (both
        sandboxes) gives this env's caps on sub-queries.
        """
        from rlm.sandbox.process import describe_protections

        report = describe_protections(self._executor)
        report["subquery_caps"] = ", ".join(f"{k}={v}" for k, v in self._limits.as_dict().items())
        return report

    @property
    def executor(self) -> Executor:
        """The executor running this env's cells (LocalExecutor or ProcessExecutor)."""
        return self._executor

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker and release the namespace; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EnvClosedError("this REPLEnv is closed; create a new one")

    def __enter__(self) -> REPLEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> REPLEnv:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<REPLEnv sandbox={self.sandbox!r} timeout={self.timeout} {state}>"


class _Busy:
    """One cell at a time per env, for sync callers (blocking) and async ones (polling).

    Contention is rare (an env normally has one driver), so the async side polls
    instead of tying a lock to one event loop: envs are used from many loops.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def hold(self) -> Any:
        return self._lock

    async def acquire_async(self) -> None:
        delay = 0.001
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def release(self) -> None:
        self._lock.release()


# --------------------------------------------------------------------------- context


def _preview(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... [{len(text) - n:,} more chars]"


def _size(item: Any) -> int:
    if isinstance(item, (str, bytes, list, tuple, dict, set)):
        return len(item)
    return len(str(item))


def describe_context(context: Any, preview_chars: int = 500) -> str:
    """Describe a context for the root prompt without pasting it: type, sizes, a preview.

    For a str: its length in chars and lines and its head. For a list/tuple: the item
    count, item types, total and per-item lengths (min, median, max, and the first few)
    and the head of the first item. For a dict: the key count, the first keys and the
    value lengths. Anything else: its type and the head of its str().
    """
    kind = type(context).__name__
    if context is None:
        return "type: NoneType (no context was given)"
    if isinstance(context, str):
        lines = context.count("\n") + (1 if context and not context.endswith("\n") else 0)
        return (
            f"type: str, {len(context):,} chars, {lines:,} lines\n"
            f"preview (first {min(preview_chars, len(context)):,} chars):\n{_preview(context, preview_chars)}"
        )
    if isinstance(context, (list, tuple)):
        n = len(context)
        if not n:
            return f"type: {kind}, 0 items"
        sizes = [_size(x) for x in context]
        types_ = sorted({type(x).__name__ for x in context[:1000]})
        first = ", ".join(f"{s:,}" for s in sizes[:10]) + (", ..." if n > 10 else "")
        head = context[0] if isinstance(context[0], str) else repr(context[0])
        return (
            f"type: {kind}, {n:,} items of type {'/'.join(types_)}; total length {sum(sizes):,}\n"
            f"item lengths: min {min(sizes):,}, median {int(statistics.median(sizes)):,}, "
            f"max {max(sizes):,}; first: [{first}]\n"
            f"preview of item 0:\n{_preview(head, preview_chars)}"
        )
    if isinstance(context, dict):
        n = len(context)
        if not n:
            return "type: dict, 0 keys"
        keys = list(context)
        sizes = [_size(v) for v in context.values()]
        shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if n > 10 else "")
        first_key = keys[0]
        first_val = context[first_key]
        head = first_val if isinstance(first_val, str) else repr(first_val)
        return (
            f"type: dict, {n:,} keys; total value length {sum(sizes):,}\n"
            f"keys: [{shown}]\n"
            f"value lengths: min {min(sizes):,}, median {int(statistics.median(sizes)):,}, "
            f"max {max(sizes):,}\n"
            f"preview of context[{first_key!r}]:\n{_preview(head, preview_chars)}"
        )
    text = str(context)
    return f"type: {kind}, str() length {len(text):,}\npreview:\n{_preview(text, preview_chars)}"
