"""The in-process executor: one worker thread per REPL env, soft limits, fastest cells.

Each ``LocalExecutor`` owns one dedicated thread that runs all of its env's cells, in
order, and that thread owns a private asyncio event loop (created once, kept for the
env's life) that drives top-level-await cells and user coroutines. Cells never run on
rlm's engine loop or on the caller's loop; a caller inside a running loop (Jupyter, a
web handler) calling ``execute`` just blocks its own thread until the cell is done, and
``aexecute`` awaits the job's future without tying up a thread.

The deadline: the waiting caller is the watchdog. When a cell's time is up it calls the
cell's ``CellStop``: the policy's loop and function checks then raise CellTimeout. If
the thread is stuck in one long call into C that releases the GIL (hashing or key
derivation over huge inputs) it cannot notice; after a grace period the executor gives
up on that thread (an asynchronous CellTimeout is queued for it, raised as soon as it
runs Python again, which also stops a long loop inside a pure-Python stdlib function),
starts a fresh worker thread for the env and reports that in the cell's error. A C call
that holds the GIL (``10**10**8``, a catastrophic regular expression) freezes the whole
process, the waiting caller included, until it returns: the cell then finishes late
(or stops at its next check). Only the worker-process executor can kill such a cell.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import inspect
import itertools
import queue
import threading
from collections.abc import Mapping
from typing import Any

from rlm import loop as engine
from rlm.errors import EnvClosedError, LLMError
from rlm.sandbox import CellOutcome, SubQueries
from rlm.sandbox.asyncio_facade import deferred, deferring
from rlm.sandbox.cells import (
    CellStop,
    CellTimeout,
    OutputBuffer,
    build_namespace,
    format_user_error,
    release_namespace,
    run_cell,
    take_final,
    timeout_reason,
    wait_for_future,
)
from rlm.sandbox.compiler import PolicyError, compile_cell
from rlm.sandbox.subqueries import (
    LLMQueryError,
    check_subquery_params,
    check_subquery_prompt,
    count_failed_slots,
    prompt_list,
    query_error_text,
)
from rlm.sandbox.tools import wrap_tools

# Seconds a cell gets after its deadline to notice the stop flag before its thread is
# given up on (the flag is checked every loop iteration, so real code needs far less).
GRACE_S = 2.0

# Limit for setup_code, which runs before any cell (a library user's code, not a model's).
SETUP_TIMEOUT_S = 60.0

NO_CLIENT = (
    "no model client is configured for this REPL, so llm_query cannot run: create it "
    "with REPLEnv(context, client=AsyncOpenAIClient(...))"
)


class _Job:
    """One cell handed to the worker thread; two futures report its start and its end."""

    __slots__ = ("code", "timeout", "filename", "started", "done", "out", "err")

    def __init__(
        self, code: str, timeout: float | None, limit: int, filename: str | None = None
    ) -> None:
        self.code = code
        self.timeout = timeout
        self.filename = filename
        self.started: concurrent.futures.Future[CellStop | None] = concurrent.futures.Future()
        self.done: concurrent.futures.Future[CellOutcome] = concurrent.futures.Future()
        # Marked running so that cancelling a waiter's wrapper never cancels the job.
        self.started.set_running_or_notify_cancel()
        self.done.set_running_or_notify_cancel()
        self.out = OutputBuffer(limit)
        self.err = OutputBuffer(limit)


class _Worker:
    """The env's cell thread and its private event loop."""

    def __init__(self, executor: LocalExecutor, name: str) -> None:
        self.executor = executor
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.abandoned = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        self._ready.set()
        try:
            while not self.abandoned:
                job = self.jobs.get()
                if job is None or self.abandoned:
                    if job is not None:  # hand it on to the worker that replaced this one
                        self.executor._requeue(job)
                    break
                self.executor._run_job(job, loop)
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            except BaseException:  # noqa: BLE001 - user async generators may misbehave on close
                pass
            loop.close()


def _async_raise(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Queue ``exc_type`` in ``thread``: raised at its next bytecode (after a C call returns)."""
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))


class LocalExecutor:
    """Runs one REPL env's cells in a worker thread of this process under the policy.

    Same constructor keywords as the process executor: ``context`` (handed to the code
    as ``context``, never copied), ``sub_queries`` (what the llm_query family calls;
    None means no client), ``setup_code`` (run once at start; its error is kept in
    ``setup_error``), ``tools`` (name -> callable, wrapped so code sees only a plain
    function) and ``max_output_chars`` (cap per stream and cell). ``grace_s`` is how long
    a cell past its deadline may take to stop before its thread is given up on.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        *,
        context: Any = None,
        sub_queries: SubQueries | None = None,
        setup_code: str | None = None,
        tools: Mapping[str, Any] | None = None,
        max_output_chars: int = 20_000,
        grace_s: float = GRACE_S,
    ) -> None:
        self._context = context
        self._sub_queries = sub_queries
        self._setup_code = setup_code
        self._tools = wrap_tools(tools)
        self.max_output_chars = int(max_output_chars)
        self.grace_s = float(grace_s)
        self.setup_error: str | None = None
        self._id = next(self._ids)
        self._worker: _Worker | None = None
        self._ns: dict[str, Any] | None = None
        self._cell_no = 0
        self._out: OutputBuffer = OutputBuffer(self.max_output_chars)
        self._err: OutputBuffer = OutputBuffer(self.max_output_chars)
        self._lock = threading.Lock()
        self._closed = False
        self._started = False
        self._current_stop: CellStop | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread, build the namespace and run the setup code (once)."""
        self._check_open()
        with self._lock:
            if self._started:
                return
            self._started = True
            self._worker = _Worker(self, f"rlm-repl-{self._id}")
            extra: dict[str, Any] = {"context": self._context}
            extra.update(_llm_functions(self))
            # Async tools hand cells deferred coroutines (made when awaited: one never
            # awaited leaves no warning on the host).
            extra.update(
                {name: deferring(tool) if inspect.iscoroutinefunction(tool) else tool
                 for name, tool in self._tools.items()}
            )
            self._ns = build_namespace(
                write_stdout=lambda text: self._out.write(text),
                write_stderr=lambda text: self._err.write(text),
                extra=extra,
            )
        if self._setup_code:
            outcome = self._run_setup(self._setup_code)
            self.setup_error = outcome.error

    def _run_setup(self, code: str) -> CellOutcome:
        # The setup code runs under its own file name, so its frames show as such.
        job = _Job(code, SETUP_TIMEOUT_S, self.max_output_chars, filename="<setup>")
        self._submit(job)
        return self._wait(job, SETUP_TIMEOUT_S)

    def interrupt(self, reason: str) -> None:
        """Stop the running cell (if any) now; its ``execute`` returns what it printed so far.

        Safe from any thread. The env stays usable: the next cell runs normally.
        """
        stop = self._current_stop
        if stop is not None:
            stop(reason)

    def close(self) -> None:
        """Stop the worker thread and drop the namespace; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            worker, self._worker = self._worker, None
        stop = self._current_stop
        if stop is not None:  # a cell still running (from another thread) ends now
            stop("the REPL environment was closed")
        if worker is not None:
            worker.jobs.put(None)
            worker.thread.join(timeout=self.grace_s)
        # The context goes now, not when a collection finds this executor's cycles: a job
        # of thousands of runs must not hold contexts until the collector runs.
        self._context = None
        ns, self._ns = self._ns, None
        if ns is not None and (worker is None or not worker.thread.is_alive()):
            # Release the context and user objects now rather than at garbage collection.
            release_namespace(ns)

    def _check_open(self) -> None:
        if self._closed:
            raise EnvClosedError("this REPL environment is closed; create a new one")

    # -- cells -------------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        self._check_open()
        if not self._started:
            self.start()
        worker = self._worker
        if worker is None:
            raise EnvClosedError("this REPL environment is closed; create a new one")
        worker.jobs.put(job)

    def _requeue(self, job: _Job) -> None:
        worker = self._worker
        if worker is None:
            job.started.set_result(None)
            job.done.set_result(CellOutcome(error="the REPL environment was closed"))
        else:
            worker.jobs.put(job)

    def _run_job(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        """Run one job on the worker thread; always resolves both of its futures."""
        ns = self._ns
        self._out, self._err = job.out, job.err
        error: str | None = None
        final: Any = None
        try:
            if ns is None:
                raise EnvClosedError("closed")
            filename = job.filename
            if filename is None:
                self._cell_no += 1
                filename = f"<cell {self._cell_no}>"
            try:
                cell = compile_cell(job.code, filename)
            except PolicyError as exc:
                error = str(exc)
            else:
                def started(stop: CellStop) -> None:
                    self._current_stop = stop
                    _resolve(job.started, stop)

                try:
                    run_cell(cell, ns, loop, on_start=started)
                except BaseException as exc:  # noqa: BLE001 - every fault of user code is reported
                    error = format_user_error(exc, cell, ns)
                    del exc
                final = take_final(ns)
        except BaseException as exc:  # noqa: BLE001 - the worker thread must survive anything
            error = error or f"{type(exc).__name__}: the REPL could not run the cell ({exc})"
        finally:
            self._current_stop = None
            _resolve(job.started, None)
            _resolve(
                job.done,
                CellOutcome(
                    stdout=job.out.getvalue(),
                    stderr=job.err.getvalue(),
                    error=error,
                    final=final,
                    truncated=job.out.truncated or job.err.truncated,
                ),
            )

    def execute(self, code: str, timeout: float | None) -> CellOutcome:
        """Run one cell, blocking the calling thread; never raises for the cell's faults."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        job = _Job(code, timeout, self.max_output_chars)
        self._submit(job)
        return self._wait(job, timeout)

    def _wait(self, job: _Job, timeout: float | None) -> CellOutcome:
        stop: CellStop | None = None
        try:
            stop = job.started.result()
            if stop is None:  # refused at compile time, or done before it could start
                return job.done.result()
            try:
                return job.done.result(timeout)
            except concurrent.futures.TimeoutError:
                pass
            stop(timeout_reason(timeout))
            try:
                return job.done.result(self.grace_s)
            except concurrent.futures.TimeoutError:
                return self._abandon(job, timeout)
        except BaseException:
            # The caller was interrupted (Ctrl-C): do not leave the cell running.
            if stop is not None:
                stop("the cell was interrupted")
            raise

    async def aexecute(self, code: str, timeout: float | None) -> CellOutcome:
        """Run one cell from any event loop; awaits the worker without blocking the loop."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        job = _Job(code, timeout, self.max_output_chars)
        self._submit(job)
        stop: CellStop | None = None
        try:
            stop = await asyncio.wrap_future(job.started)
            if stop is None:
                return await asyncio.wrap_future(job.done)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(job.done), timeout)
            except TimeoutError:
                pass
            stop(timeout_reason(timeout))
            try:
                return await asyncio.wait_for(asyncio.wrap_future(job.done), self.grace_s)
            except TimeoutError:
                return self._abandon(job, timeout)
        except BaseException:
            # The awaiting task was cancelled: stop the cell rather than let it run on.
            if stop is not None:
                stop("the cell was cancelled")
            raise

    def _abandon(self, job: _Job, timeout: float | None) -> CellOutcome:
        """Give up on a worker stuck in C code: queue a CellTimeout for it, start a new one."""
        with self._lock:
            old = self._worker
            if old is not None and not self._closed:
                old.abandoned = True
                self._worker = _Worker(self, f"rlm-repl-{self._id}")
                while True:  # jobs queued behind the stuck cell move to the new thread
                    try:
                        pending = old.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if pending is not None:
                        self._worker.jobs.put(pending)
        if old is not None:
            _async_raise(old.thread, CellTimeout)
        limit = f"{timeout:g} s" if timeout is not None else "its time"
        return CellOutcome(
            stdout=job.out.getvalue(),
            stderr=job.err.getvalue(),
            error=(
                f"TimeoutError: the cell ran past its {limit} limit and did not stop within "
                f"{self.grace_s:g} s more: it is stuck inside one long C-level operation "
                "(one call that does a huge amount of work at once), which the in-process "
                "sandbox cannot interrupt. The REPL continues on a fresh worker thread; "
                "variables are kept but may be inconsistent, and the stuck operation may "
                "still finish in the background. Break the work into smaller steps; "
                "sandbox='process' kills such cells outright."
            ),
            truncated=job.out.truncated or job.err.truncated,
        )

    def get(self, name: str) -> Any:
        """Return the object bound to ``name`` in the namespace (the object itself, no copy).

        Raises KeyError if no such variable exists.
        """
        self._check_open()
        if not self._started:
            self.start()
        ns = self._ns
        if ns is None or not isinstance(name, str) or name.startswith("_") or name not in ns:
            raise KeyError(name)
        return ns[name]

    @property
    def namespace(self) -> dict[str, Any]:
        """The live namespace (for the host's own inspection; never hand it to cell code)."""
        self._check_open()
        if not self._started:
            self.start()
        assert self._ns is not None
        return self._ns

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve(future: concurrent.futures.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _llm_functions(executor: LocalExecutor) -> dict[str, Any]:
    """The llm_query family for one env: plain closures over the executor's sub-queries.

    They reach the executor only through their closure cells (``__closure__`` is an
    underscore name, so cell code cannot); they never expose the client. Sync forms
    block the cell's thread on the engine loop; async forms await on the cell's
    private loop while the request itself runs on the engine loop.
    """

    def service() -> SubQueries:
        sq = executor._sub_queries
        if sq is None:
            raise LLMQueryError(NO_CLIENT)
        return sq

    def namespace() -> dict[str, Any]:
        ns = executor._ns
        if ns is None:
            raise LLMQueryError("the REPL environment is closed")
        return ns

    def note_failures(results: list[str]) -> None:
        failed = count_failed_slots(results)
        if failed:
            executor._err.write(
                f"llm_query_batch: {failed} of {len(results)} sub-queries failed after "
                "retries; their slots hold '[llm_query error: ...]' strings\n"
            )

    def llm_query(prompt: Any, **params: Any) -> str:
        """Ask a sub-model one prompt (a str or a list of chat messages); returns its reply."""
        check_subquery_prompt(prompt)
        check_subquery_params(params)
        sq = service()
        ns = namespace()
        future = engine.submit(sq.query(prompt, dict(params)))
        try:
            return wait_for_future(ns, future)
        except (LLMError, Exception) as exc:
            raise LLMQueryError(query_error_text(exc)) from None

    def llm_query_batch(prompts: Any, **params: Any) -> list[str]:
        """Ask a sub-model many prompts concurrently; replies in order, failures as error strings."""
        items = prompt_list(prompts)
        check_subquery_params(params)
        if not items:
            return []
        sq = service()
        ns = namespace()
        future = engine.submit(sq.batch(items, dict(params)))
        try:
            results = wait_for_future(ns, future)
        except (LLMError, Exception) as exc:
            raise LLMQueryError(query_error_text(exc)) from None
        note_failures(results)
        return results

    async def query_async(prompt: Any, params: dict[str, Any]) -> str:
        sq = service()
        try:
            return await asyncio.wrap_future(engine.submit(sq.query(prompt, params)))
        except (LLMError, Exception) as exc:
            raise LLMQueryError(query_error_text(exc)) from None

    async def batch_async(items: list[Any], params: dict[str, Any]) -> list[str]:
        if not items:
            return []
        sq = service()
        try:
            results = await asyncio.wrap_future(engine.submit(sq.batch(items, params)))
        except (LLMError, Exception) as exc:
            raise LLMQueryError(query_error_text(exc)) from None
        note_failures(results)
        return results

    # Plain functions returning deferred coroutines (made when awaited: one never
    # awaited leaves no warning behind); the arguments are checked at the call.
    def llm_query_async(prompt: Any, **params: Any) -> Any:
        """Async form of llm_query: ``await llm_query_async(prompt)``."""
        check_subquery_prompt(prompt)
        check_subquery_params(params)
        return deferred(query_async, prompt, dict(params))

    def llm_query_batch_async(prompts: Any, **params: Any) -> Any:
        """Async form of llm_query_batch: ``await llm_query_batch_async(prompts)``."""
        items = prompt_list(prompts)
        check_subquery_params(params)
        return deferred(batch_async, items, dict(params))

    return {
        "llm_query": llm_query,
        "llm_query_batch": llm_query_batch,
        "llm_query_async": llm_query_async,
        "llm_query_batch_async": llm_query_batch_async,
    }
