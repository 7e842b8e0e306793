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
- What stays is the worker process itself. Between tasks, isolation therefore rests on
  the sandbox policy plus the reset (as it does between two in-process REPLs), not on
  a new process: code that escaped the policy in one task could wait for the next.
  Pools are scoped to one owner (one ``RLM``: one job, one user), a worker serves at
  most ``max_uses`` REPLs, and idle workers are killed after ``idle_s`` (and when the
  pool is closed or dropped). Pass
  ``reuse_workers=False`` to ``RLM`` (``rlm batch --fresh-workers``) for a new process
  per REPL; servers that run requests of different callers do so.

The pool holds opaque entries (``PooledWorker``); the process executor makes them and
performs the reset handshake, so this module only keeps, lends and retires them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlm.errors import ConfigError

__all__ = ["PooledWorker", "WorkerPool"]


class PooledWorker(Protocol):
    """What the pool needs of a worker it keeps: whether it still lives, and a way to end it."""

    @property
    def alive(self) -> bool: ...

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
        """Count a worker that failed its reset (it was killed instead of kept)."""
        with self._lock:
            self._counts["refused"] += 1

    def stats(self) -> dict[str, int]:
        """Counts so far: workers ``started`` fresh, ``reused``, ``returned`` after a reset,
        ``retired`` (worn out, pool closed), ``refused`` (failed the reset), ``idle`` now."""
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
