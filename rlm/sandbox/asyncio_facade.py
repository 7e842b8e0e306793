"""The ``asyncio`` module as a cell sees it: the idioms real models write, on the env's loop.

Models fan out with ``await asyncio.gather(*[llm_query_async(p) for p in prompts])``,
bound concurrency with a ``Semaphore`` and time out with ``wait_for``. The real module
cannot be handed over: its futures and tasks lead to the event loop, whose methods start
processes and open sockets. So this facade offers coroutine functions and small handles
of its own, and every task runs on the cell's private loop (never the engine loop or the
caller's). Tasks do not outlive their cell: when a cell ends (normally, by error or at
its deadline) the tasks it started and did not await are cancelled.

Every coroutine a cell is handed (these functions', the llm_query family's, its own
``async def``'s) is made only when it is first awaited (``deferred``): one a cell makes
and never awaits then leaves nothing behind, where a real coroutine would print
"coroutine ... was never awaited" on the host's stderr when collected.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from rlm.sandbox.boundary import SandboxCoroutine, deferred

__all__ = ["CellTasks", "asyncio_exports", "deferred", "deferring"]

_NO_LOOP = (
    "{what} needs a running event loop: use it in a cell with top-level await "
    "(`await asyncio.gather(...)`), or inside `asyncio.run(main())`"
)


def deferring(fn: Callable[..., Awaitable[Any]], *, module: str | None = None) -> Callable[..., Any]:
    """The coroutine function ``fn`` as a plain function whose calls return ``deferred`` ones.

    The arguments are bound at call time (a wrong call raises TypeError there, as a real
    coroutine function's does); ``module`` sets the ``__module__`` the function shows.
    """
    signature = inspect.signature(fn)

    def call(*args: Any, **kwargs: Any) -> SandboxCoroutine:
        signature.bind(*args, **kwargs)
        return deferred(fn, *args, **kwargs)

    call.__name__ = fn.__name__
    call.__qualname__ = fn.__qualname__
    call.__doc__ = fn.__doc__
    if module is not None:
        call.__module__ = module
    return call


class CellTasks:
    """The tasks one namespace's cells started; ``cancel_all`` ends those still running."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def add(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_all(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Cancel every unfinished task and let them unwind on ``loop`` (if it is idle)."""
        pending = [t for t in self._tasks if not t.done()]
        self._tasks.clear()
        if not pending:
            return
        for task in pending:
            task.cancel()
        if loop is None or loop.is_closed() or loop.is_running():
            return
        try:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except BaseException:  # noqa: BLE001 - a cancelled user task may raise anything; it is over
            pass


class Task:
    """A task started by ``asyncio.create_task`` in a cell: await it, or ask about it."""

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Future[Any]) -> None:
        self._task = task

    def __await__(self) -> Any:
        return self._task.__await__()

    def done(self) -> bool:
        """True when the task has finished (or was cancelled)."""
        return self._task.done()

    def cancelled(self) -> bool:
        """True when the task was cancelled."""
        return self._task.cancelled()

    def cancel(self) -> bool:
        """Ask the task to stop; False if it had already finished."""
        return self._task.cancel()

    def result(self) -> Any:
        """The task's return value (raises its exception, or InvalidStateError if running)."""
        return self._task.result()

    def exception(self) -> BaseException | None:
        """The exception the task raised, or None."""
        return self._task.exception()

    def __repr__(self) -> str:
        state = "done" if self._task.done() else "pending"
        return f"<Task {state}>"


class _AsCompleted:
    """Iterator of awaitables, each giving the next result to finish (as_completed)."""

    __slots__ = ("_left", "_queue", "_deadline", "_loop")

    def __init__(self, futures: list[asyncio.Future[Any]], timeout: float | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._queue: asyncio.Queue[asyncio.Future[Any]] = asyncio.Queue()
        for fut in futures:
            fut.add_done_callback(self._queue.put_nowait)
        self._left = len(futures)
        self._loop = loop
        self._deadline = None if timeout is None else loop.time() + timeout

    def __iter__(self) -> Iterator[Awaitable[Any]]:
        return self

    def __next__(self) -> Awaitable[Any]:
        if self._left <= 0:
            raise StopIteration
        self._left -= 1
        # Wrapped: the coroutine's frame (this module's globals) must stay out of reach.
        return deferred(self._next_done)

    async def _next_done(self) -> Any:
        if self._deadline is None:
            fut = await self._queue.get()
        else:
            remaining = max(0.0, self._deadline - self._loop.time())
            try:
                fut = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                raise TimeoutError("as_completed() timed out") from None
        return fut.result()


def _running_loop(what: str, *unused: Any) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        for aw in unused:  # never awaited now: close them rather than warn later
            if asyncio.iscoroutine(aw):
                aw.close()
        raise RuntimeError(_NO_LOOP.format(what=what)) from None


def _awaitable(aw: Any) -> Any:
    return aw._task if type(aw) is Task else aw  # noqa: SLF001 - our own handle


def asyncio_exports(
    tasks: CellTasks, cell_loop: Callable[[], asyncio.AbstractEventLoop | None]
) -> dict[str, Any]:
    """The facade's names for one namespace; ``cell_loop`` gives the loop its cells run on."""

    async def sleep(delay: float, result: Any = None) -> Any:
        """Wait ``delay`` seconds without blocking other tasks; a cell's deadline cuts it."""
        return await asyncio.sleep(delay, result)

    async def gather(*aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
        """Run awaitables concurrently and return their results in order."""
        _running_loop("asyncio.gather", *aws)
        results = await asyncio.gather(*(_awaitable(a) for a in aws), return_exceptions=return_exceptions)
        return list(results)

    async def wait_for(aw: Awaitable[Any], timeout: float | None) -> Any:
        """Await ``aw`` but give up with TimeoutError after ``timeout`` seconds."""
        return await asyncio.wait_for(_awaitable(aw), timeout)

    def as_completed(aws: Iterable[Awaitable[Any]], *, timeout: float | None = None) -> _AsCompleted:
        """Awaitables that give the results in the order they finish."""
        aws = list(aws)
        loop = _running_loop("asyncio.as_completed", *aws)
        futures = []
        for aw in aws:
            fut = asyncio.ensure_future(_awaitable(aw), loop=loop)
            tasks.add(fut)
            futures.append(fut)
        return _AsCompleted(futures, timeout, loop)

    def create_task(coro: Awaitable[Any], *, name: str | None = None) -> Task:
        """Start ``coro`` concurrently; it is cancelled if still running when the cell ends."""
        loop = _running_loop("asyncio.create_task", coro)
        task = asyncio.ensure_future(_awaitable(coro), loop=loop)
        tasks.add(task)
        return Task(task)

    def run(main: Awaitable[Any]) -> Any:
        """Run ``main`` to completion on this REPL's loop (from a cell without await)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if hasattr(main, "close"):
                main.close()
            raise RuntimeError(
                "asyncio.run() cannot be called from a running event loop: this cell already "
                "runs on one, so write `await main()` instead"
            )
        loop = cell_loop()
        if loop is None or loop.is_closed():
            raise RuntimeError("asyncio.run() is only available while a cell runs")
        try:
            return loop.run_until_complete(asyncio.ensure_future(main, loop=loop))
        finally:
            tasks.cancel_all(loop)

    return {
        "sleep": deferring(sleep),
        "gather": deferring(gather),
        "wait_for": deferring(wait_for),
        "as_completed": as_completed,
        "create_task": create_task,
        "run": run,
        "Semaphore": asyncio.Semaphore,
        "BoundedSemaphore": asyncio.BoundedSemaphore,
        "Lock": asyncio.Lock,
        "Event": asyncio.Event,
        "Queue": asyncio.Queue,
        "QueueEmpty": asyncio.QueueEmpty,
        "QueueFull": asyncio.QueueFull,
        "TimeoutError": TimeoutError,
        "CancelledError": asyncio.CancelledError,
    }
