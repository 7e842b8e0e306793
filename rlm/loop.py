"""The engine loop: one long-lived event loop that owns every HTTP connection pool.

Async callers use their own running loop directly. Sync callers (a script, a notebook
cell, a worker thread, a web handler running inside another loop) are served by one
background loop thread, started on first use, reached with ``run_coroutine_threadsafe``.
There is no ``asyncio.run`` per call (it would throw the pool away and fails inside
Jupyter) and no nest_asyncio. A sync call made on the engine thread itself would wait
for a loop that can never run it, so it is refused with ``LoopError``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from rlm.errors import LoopError

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_shutdown_hooks: list[Callable[[], Awaitable[None]]] = []


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def engine_loop() -> asyncio.AbstractEventLoop:
    """Return the background engine loop, starting its thread on first use."""
    global _loop, _thread
    loop = _loop
    if loop is not None and not loop.is_closed():
        return loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=_serve, args=(loop, ready), name="rlm-engine-loop", daemon=True
            )
            thread.start()
            ready.wait()
            _loop, _thread = loop, thread
        return _loop


def in_engine_thread() -> bool:
    """True when the caller is running on the engine loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the engine loop and block this thread until it finishes.

    Works from any thread, including one whose own event loop is running (a Jupyter
    cell). If the wait is interrupted (Ctrl-C) the coroutine is cancelled on the engine
    loop, so nothing keeps running behind the caller's back.
    """
    if in_engine_thread():
        coro.close()
        raise LoopError(
            "a sync rlm call was made on rlm's engine loop thread, where it would deadlock; "
            "use the async form (await ...) from coroutines running on that loop"
        )
    future = asyncio.run_coroutine_threadsafe(coro, engine_loop())
    try:
        return future.result(timeout)
    except BaseException:
        # KeyboardInterrupt, timeout or the coroutine's own error: make sure it is not
        # left running (cancel is a no-op once it is done).
        future.cancel()
        raise


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the engine loop without waiting; returns a thread-safe future."""
    return asyncio.run_coroutine_threadsafe(coro, engine_loop())


# How often a caller's loop wakes up while it waits for rlm's threads (see ``waking``).
WAKE_INTERVAL_S = 0.2
# Per caller loop: how many waits are open, and whether its wake-up timer is armed.
_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Any]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def waking() -> Iterator[None]:
    """While the running loop awaits work done on another thread, wake it every 0.2 s.

    An idle loop sleeps in ``select()`` until a socket or timer is ready, and a callback
    queued with ``call_soon`` from a signal handler does not wake it. ipykernel cancels
    an interrupted async cell exactly that way, so without a timer, interrupting
    ``await rlm.acompletion(...)`` in Jupyter would take effect only when the current
    request returns (a minute, for a slow model). A tick every 0.2 s bounds that delay
    at no measurable cost; one timer per loop however many calls wait, none on the
    engine loop (whose own work keeps it awake).
    """
    loop = asyncio.get_running_loop()
    if loop is _loop:
        yield
        return
    state = _waiters.get(loop)
    if state is None:
        state = _waiters[loop] = [0, False]
    state[0] += 1
    if not state[1]:
        state[1] = True
        loop.call_later(WAKE_INTERVAL_S, _tick, loop, state)
    try:
        yield
    finally:
        state[0] -= 1


def _tick(loop: asyncio.AbstractEventLoop, state: list[Any]) -> None:
    if state[0] > 0:
        loop.call_later(WAKE_INTERVAL_S, _tick, loop, state)
    else:
        state[1] = False


def on_shutdown(hook: Callable[[], Awaitable[None]]) -> None:
    """Register an async cleanup (closing a connection pool) to run before the loop stops."""
    _shutdown_hooks.append(hook)


def remove_shutdown_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """Forget a hook registered with ``on_shutdown`` (its owner closed itself)."""
    try:
        _shutdown_hooks.remove(hook)
    except ValueError:
        pass


async def _run_hooks() -> None:
    hooks = list(_shutdown_hooks)
    _shutdown_hooks.clear()
    for hook in hooks:
        try:
            await hook()
        except Exception:  # noqa: BLE001 - shutdown must go on whatever one hook does
            pass
    # Let transports finish closing their sockets before the loop goes away.
    await asyncio.sleep(0)
    # Whatever still runs (a worker channel's reader, a lag probe) is cancelled and
    # given a moment to end, rather than destroyed pending with a warning at exit.
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=1.0)


def shutdown(timeout: float = 5.0) -> None:
    """Close registered pools and stop the engine loop. Called at interpreter exit."""
    global _loop, _thread
    with _lock:
        loop, thread = _loop, _thread
        _loop = _thread = None
    if loop is None or loop.is_closed():
        return
    if thread is not None and thread.is_alive():
        try:
            asyncio.run_coroutine_threadsafe(_run_hooks(), loop).result(timeout)
        except Exception:  # noqa: BLE001
            pass
        try:
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout)
        except Exception:  # noqa: BLE001
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
    if not loop.is_running():
        loop.close()


atexit.register(shutdown)
