"""What a process-sandbox executor must release however it ends: its worker and channel.

``WorkerResources`` is shared by the engine loop (which starts and buries workers) and
whichever thread closes the executor (``close``, a garbage-collection finalizer, the
interpreter's exit), so every change happens under one lock, and a worker started after
the executor closed is killed on arrival instead of leaking. It holds only what must be
released (the worker's pid and uid, its zygote, its channel transport) and the two ways
to release it; deciding when is the executor's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable

from rlm import loop as engine
from rlm.errors import EnvClosedError
from rlm.sandbox.zygote_client import ZygoteClient

__all__ = ["WorkerResources", "close_transport", "kill_group"]


class WorkerResources:
    """What must be released however the executor ends (close, GC or interpreter exit).

    Shared by the engine loop (which starts and buries workers) and whichever thread
    closes the executor, so every change happens under one lock, and a worker started
    after the executor closed is killed on arrival instead of leaking.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.pid: int | None = None
        self.uid: int | None = None
        self.zygote: ZygoteClient | None = None
        self.transport: asyncio.BaseTransport | None = None

    def check_open(self) -> None:
        """Raise ``EnvClosedError`` once the executor was closed."""
        with self.lock:
            if self.closed:
                raise EnvClosedError("this REPL environment is closed; create a new one")

    def adopt(self, pid: int, uid: int | None, zygote: ZygoteClient) -> None:
        """Hold worker ``pid`` as the current one; closed already: kill it and raise."""
        with self.lock:
            if not self.closed:
                self.pid, self.uid, self.zygote = pid, uid, zygote
                return
        kill_group(pid)
        zygote.reap(pid)
        raise EnvClosedError("this REPL environment is closed; create a new one")

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Hold the current worker's channel transport; closed already: close it and raise."""
        with self.lock:
            if not self.closed:
                self.transport = transport
                return
        transport.close()
        raise EnvClosedError("this REPL environment is closed; create a new one")

    def kill_now(self, pid: int, mark: Callable[[], None] | None = None) -> None:
        """SIGKILL ``pid`` if it is still this env's worker (not yet reaped or handed to a
        pool); any thread. ``mark`` runs first, under the same condition, so whoever sees
        the worker die also sees why."""
        with self.lock:
            if pid == self.pid:
                if mark is not None:
                    mark()
                kill_group(pid)

    def kill(self, pid: int | None = None, grace: float = 0.0) -> int | None:
        """SIGKILL worker ``pid`` (default: the current one) and everything it made; reap it.

        ``grace`` > 0 is for a worker that died on its own: its wait status (the reason
        the cell reports) is given that long to arrive before the kill. Returns the wait
        status, or None if unknown (or already reaped before).
        """
        with self.lock:
            if pid is None or pid == self.pid:
                pid, zygote, transport = self.pid, self.zygote, self.transport
                self.pid = self.transport = None
            else:
                return None  # not the current worker: buried already
        status = None
        if pid is not None:
            if grace <= 0:
                kill_group(pid)
            if zygote is not None:
                status = zygote.reap(pid, grace)
        if transport is not None:
            close_transport(transport)
        return status

    def disown(self, pid: int) -> tuple[int, int | None, ZygoteClient, asyncio.BaseTransport] | None:
        """Hand worker ``pid`` over (to a pool) instead of killing it on release."""
        with self.lock:
            if pid != self.pid or self.zygote is None or self.transport is None:
                return None
            handed = (pid, self.uid, self.zygote, self.transport)
            self.pid = self.transport = None
            return handed

    def release(self) -> None:
        """Mark the executor closed and kill its worker (any thread, idempotent)."""
        with self.lock:
            self.closed = True
        self.kill()


def kill_group(pid: int) -> None:
    """SIGKILL worker ``pid`` (its init) and its process group; a gone pid is no error."""
    # ``pid`` is the worker's init: with a PID namespace its death takes every process
    # in it; without, the zygote sweeps the worker's uid after reaping. The zygote reaps
    # only on our request, so the pid cannot have been reused meanwhile.
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)


def close_transport(transport: asyncio.BaseTransport) -> None:
    """Close a channel transport from any thread, on its own loop (waiting briefly)."""
    loop = getattr(transport, "_loop", None)
    if loop is None or loop.is_closed():
        return
    if engine.in_engine_thread() or not loop.is_running():
        transport.close()
        return
    done = threading.Event()

    def close() -> None:
        transport.close()
        done.set()

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(close)
        done.wait(2.0)
