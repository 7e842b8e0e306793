"""Warm process-sandbox workers, reset and reused across the REPLs of one owner.

Starting a process-sandbox worker costs two forks of the zygote's image (its init and
the worker), a PID and a mount namespace, a tmpfs and a uid lease, and tearing it down
costs as much again: about 20 ms of CPU on a 2-core machine, more than everything
else a short task does. A ``WorkerPool`` keeps workers whose REPL has closed and lends
them to the next REPL with the same limits, so a job of thousands of tasks forks a few
hundred workers instead of thousands.

What a borrowed worker carries over, and what it does not:

- Before a worker goes back to the pool it *resets*: its namespace (every variable),
  its event loop and tasks, its pending requests and its output are dropped, every
  file in its private root is removed, and it checks that it runs no thread and no
  process of its own beyond its fixed ones and that its root is empty. A worker that
  cannot show all of that is killed, never lent.
- The next REPL then loads its own context, tools and setup code into a new namespace
  with new per-REPL module facades (random's generator, csv's field size limit, the
  asyncio facade...), exactly as a fresh worker would.
- The OS layer does not change: the same confinement (namespaces, jail, uid, rlimits)
  applies for the worker's whole life, and ``protections`` reports it as before.
- The host decides reuse from what it saw itself; anything a worker says about itself
  once a cell ran in it is a claim. A reset's "clean" can only forbid reuse, never
  prove it; ``protections`` is what the worker reported when fresh, before any user
  code; a kill stays armed until the host sees the worker quiet. A worker must ask the
  host before it first hands out numpy, pandas or yaml (while its code is still the
  sandbox's own), and the host then never lends it again: those libraries run
  arbitrary code by design (yaml.unsafe_load, pickles), so such a worker is assumed
  fully compromised. Nor is a worker lent that timed out, died or was still busy.
- What stays is the worker process itself. Between tasks, isolation therefore rests on
  the sandbox policy plus the reset (as it does between two in-process REPLs), not on
  a new process: code that escaped the policy itself in one task could wait for the next.
  Pools are scoped to one owner (one ``RLM``: one job, one user), a worker serves at
  most ``max_uses`` REPLs, and idle workers are killed after ``idle_s`` (and when the
  pool is closed or dropped). Pass
  ``reuse_workers=False`` to ``RLM`` (``rlm batch --fresh-workers``) for a new process
  per REPL; servers that run requests of different callers do so.

The pool itself (``WorkerPool``) holds opaque entries (``PooledWorker``) and only keeps,
lends and retires them. The process executor's entries are ``WarmWorker``s: a worker's
channel and what kills it, handed over by an executor that closed, reset here
(``schedule_recycle``) and given to the pool only if the reset's reply says clean.
This module does not decide whether a worker may be offered at all: the executor does,
from what the host itself saw of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlm.errors import ConfigError
from rlm.sandbox.host_threads import host_pool
from rlm.sandbox.worker_link import WorkerLink, WorkerLost
from rlm.sandbox.worker_resources import close_transport, kill_group
from rlm.sandbox.zygote_client import ZygoteClient

__all__ = ["PooledWorker", "WarmWorker", "WorkerPool", "schedule_recycle"]


class PooledWorker(Protocol):
    """What the pool needs of a worker it keeps: whether it still lives, and a way to end it."""

    @property
    def alive(self) -> bool:
        """False once the worker died or was discarded."""

    def discard(self) -> None:
        """Kill the worker and release what it holds; safe from any thread, idempotent."""


@dataclass
class _Idle:
    worker: PooledWorker
    uses: int
    since: float = field(default_factory=time.monotonic)


class WorkerPool:
    """Idle, reset process-sandbox workers, lent to new REPLs with the same limits.

    ``max_idle`` caps how many idle workers are kept (extra ones are killed),
    ``max_uses`` how many REPLs one worker serves before it is retired, ``idle_s`` how
    long an idle worker is kept. Thread-safe. ``close()`` kills every idle worker and
    makes the pool refuse new ones (they are killed on arrival).
    """

    def __init__(self, *, max_idle: int = 256, max_uses: int = 100, idle_s: float = 30.0) -> None:
        for name, value in (("max_idle", max_idle), ("max_uses", max_uses)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, not {value!r}")
        if isinstance(idle_s, bool) or not isinstance(idle_s, int | float) or idle_s <= 0:
            raise ConfigError(f"idle_s must be a positive number of seconds, not {idle_s!r}")
        self.max_idle = max_idle
        self.max_uses = max_uses
        self.idle_s = float(idle_s)
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._counts = {"started": 0, "reused": 0, "returned": 0, "retired": 0, "refused": 0}
        # A pool dropped without close() still kills its idle workers.
        self._finalizer = weakref.finalize(self, WorkerPool._kill_all, self._idle, self._lock)

    def take(self, key: Hashable) -> tuple[PooledWorker, int] | None:
        """An idle worker made for ``key`` and how many REPLs it served, or None."""
        stale: list[PooledWorker] = []
        found: tuple[PooledWorker, int] | None = None
        now = time.monotonic()
        with self._lock:
            entries = self._idle.get(key, [])
            while entries:
                entry = entries.pop()
                if not entry.worker.alive or now - entry.since > self.idle_s:
                    stale.append(entry.worker)
                    continue
                found = (entry.worker, entry.uses)
                self._counts["reused"] += 1
                break
        self._discard(stale)
        return found

    def note_started(self) -> None:
        """Count a worker started fresh because none was idle (for ``stats``)."""
        with self._lock:
            self._counts["started"] += 1

    def give(self, key: Hashable, worker: PooledWorker, uses: int) -> bool:
        """Keep a worker that has served ``uses`` REPLs and reset; False if it was killed."""
        retire: list[PooledWorker] = []
        kept = False
        now = time.monotonic()
        with self._lock:
            if self._closed or uses >= self.max_uses or not worker.alive:
                retire.append(worker)
                self._counts["retired"] += 1
            else:
                self._counts["returned"] += 1
                # Drop the ones idle too long or dead, then the oldest beyond the cap.
                keep, stale = self._split(self._idle.get(key, []), now)
                retire.extend(stale)
                keep.append(_Idle(worker, uses))
                while self._count_idle(key, keep) > self.max_idle:
                    retire.append(keep.pop(0).worker)
                self._idle[key] = keep
                kept = True
        self._discard(retire)
        return kept

    def note_refused(self) -> None:
        """Count a worker killed instead of kept: it failed its reset, or the host would
        not offer it at all (it handed out a data library)."""
        with self._lock:
            self._counts["refused"] += 1

    def stats(self) -> dict[str, int]:
        """Counts so far: workers ``started`` fresh, ``reused``, ``returned`` after a reset,
        ``retired`` (worn out, pool closed), ``refused`` (failed the reset, or never offered:
        it handed out a data library), ``idle`` now."""
        with self._lock:
            out = dict(self._counts)
            out["idle"] = sum(len(v) for v in self._idle.values())
        return out

    def expire(self) -> None:
        """Kill the workers idle for longer than ``idle_s`` (the executor calls this on a
        timer after each return, so an unused pool empties by itself)."""
        now = time.monotonic()
        old: list[PooledWorker] = []
        with self._lock:
            for key, entries in list(self._idle.items()):
                keep, stale = self._split(entries, now)
                old.extend(stale)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        self._discard(old)

    def close(self) -> None:
        """Kill every idle worker; workers given back later are killed on arrival."""
        with self._lock:
            self._closed = True
        self._finalizer()

    @staticmethod
    def _kill_all(idle: dict[Hashable, list[_Idle]], lock: threading.Lock) -> None:
        with lock:
            workers = [e.worker for entries in idle.values() for e in entries]
            idle.clear()
        WorkerPool._discard(workers)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"WorkerPool(idle={s['idle']}, started={s['started']}, reused={s['reused']}, "
                f"max_uses={self.max_uses})")

    def _split(self, entries: list[_Idle], now: float) -> tuple[list[_Idle], list[PooledWorker]]:
        """``entries`` still worth lending, and the workers of the others (idle too long
        or dead)."""
        keep: list[_Idle] = []
        stale: list[PooledWorker] = []
        for entry in entries:
            if entry.worker.alive and now - entry.since <= self.idle_s:
                keep.append(entry)
            else:
                stale.append(entry.worker)
        return keep, stale

    def _count_idle(self, key: Hashable, replacing: list[_Idle]) -> int:
        return sum(len(v) for k, v in self._idle.items() if k != key) + len(replacing)

    @staticmethod
    def _discard(workers: list[Any]) -> None:
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.discard()


# -- the process executor's warm workers -------------------------------------------

_RESET_TIMEOUT_S = 10.0
# Recycling tasks and ending channel readers (a task nobody references may be
# collected mid-way).
_recycling: set[asyncio.Task[None]] = set()


class WarmWorker:
    """A reset worker waiting in a ``WorkerPool``: its channel and what kills it."""

    def __init__(
        self, link: WorkerLink, pid: int, uid: int | None, zygote: ZygoteClient,
        transport: asyncio.BaseTransport,
    ) -> None:
        self.link, self.pid, self.uid, self.zygote, self.transport = link, pid, uid, zygote, transport
        self._lock = threading.Lock()
        self._gone = False

    @property
    def alive(self) -> bool:
        """False once it was handed over or discarded, or its channel closed."""
        return not self._gone and not self.link.dead

    def hand_over(self) -> None:
        """An executor owns it now (and kills it when done): ``discard`` does nothing more."""
        with self._lock:
            self._gone = True

    def discard(self) -> None:
        """Kill it now; reap it (a blocking zygote request) off the caller's thread."""
        with self._lock:
            if self._gone:
                return
            self._gone = True
        self.link.dead = True
        kill_group(self.pid)
        close_transport(self.transport)
        _finish_reader(self.link.read_task)
        with contextlib.suppress(RuntimeError):  # interpreter exit: the zygote reaps all
            host_pool().submit(self.zygote.reap, self.pid)


async def _recycle(pool: WorkerPool, key: Any, warm: WarmWorker, uses: int) -> None:
    """Reset a closed REPL's worker and give it to ``pool``, or kill it."""
    try:
        reply = await warm.link.command({"op": "reset"}, _RESET_TIMEOUT_S)
    except (TimeoutError, WorkerLost, ConnectionError, OSError):
        reply = {}
    if reply.get("op") != "clean" or reply.get("ok") is not True:
        pool.note_refused()
        warm.discard()
        return
    if pool.give(key, warm, uses):
        # Weakly: a timer must not keep a dropped pool (and so its workers) alive.
        asyncio.get_running_loop().call_later(pool.idle_s + 0.5, _expire, weakref.ref(pool))


def _expire(pool_ref: weakref.ref[WorkerPool]) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.expire()


def schedule_recycle(pool: WorkerPool, key: Any, warm: WarmWorker, uses: int) -> None:
    """From any thread: reset ``warm`` on its channel's loop, then give it to ``pool``."""
    loop = warm.link.read_task.get_loop()
    if loop.is_closed():
        warm.discard()
        return

    def start() -> None:
        _hold(loop.create_task(_recycle(pool, key, warm, uses)))

    try:
        if loop is _running_loop():
            start()
        else:
            loop.call_soon_threadsafe(start)
    except RuntimeError:  # the loop is closed: nothing will reuse it
        warm.discard()


def _hold(task: asyncio.Task[None]) -> None:
    """Keep ``task`` referenced until it ends (on its loop's thread)."""
    _recycling.add(task)
    task.add_done_callback(_recycling.discard)


def _finish_reader(task: asyncio.Task[None]) -> None:
    """Cancel a discarded worker's channel reader and hold it until it has ended.

    Its stream protocol refers to the reader only weakly, so once nothing else holds
    the link the pending reader would be collected mid-wait (a warning at best).
    """
    loop = task.get_loop()

    def finish() -> None:
        _hold(task)
        task.cancel()

    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs any more
        loop.call_soon_threadsafe(finish)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
