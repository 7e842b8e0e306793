"""The host's own judgement of when a worker's cell is over: a kill a frame cannot disarm.

A worker's ``result`` frame only *says* the cell ended; code that escaped the policy can
send one and keep running. So a ``CellWatch`` keeps the wall-clock kill armed past the
result until the host sees the worker quiet: from the result on, it samples the CPU
time of the worker's process tree (``activity``, read from the kernel) every
``SETTLE_S``. Quiet (at most ``QUIET_SLACK_S`` plus ``QUIET_SHARE`` of the time passed)
means the cell is over, and the watch turns into an idle watch that checks the same
every ``IDLE_CHECK_S`` until the next command. Busy past the cell's kill deadline, or
busy while idle, means the worker is killed, whatever it says.

Every check runs on the deadline thread (``deadlines``), never on the engine loop. Where
the kernel cannot say (no ``/proc``), the result frame is all there is to go on, as
before. This module holds the judgement only: the executor decides what a kill means
for its REPL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rlm.sandbox import deadlines
from rlm.sandbox.activity import tree_cpu_seconds

__all__ = ["IDLE_CHECK_S", "QUIET_SHARE", "QUIET_SLACK_S", "SETTLE_S", "CellWatch"]

SETTLE_S = 0.25
IDLE_CHECK_S = 5.0
QUIET_SLACK_S = 0.03
QUIET_SHARE = 0.10

# Why the watch kills: words for the cell that finds its worker gone.
BUSY_AFTER_RESULT = "it kept running after it reported its cell had ended"
BUSY_WHILE_IDLE = "it used CPU while no cell was running"


class CellWatch:
    """The kill of one worker's cells, disarmed only when the host sees the worker quiet.

    ``kill(reason)`` is called on the deadline thread: ``reason`` is "" for a cell that
    ran past its deadline, else why a worker that claimed to be done was killed.
    Thread-safe; ``stop`` ends every check (the worker is gone or handed over).
    """

    def __init__(self, pid: int, kill: Callable[[str], None]) -> None:
        self.pid = pid
        self.kill = kill
        self.lock = threading.Lock()
        self.generation = 0
        self.token: int | None = None
        self.deadline: float | None = None
        self.sample: tuple[float, float] | None = None
        # Set by a cell with a time limit: from then on idleness is checked between
        # commands too (without a limit nothing is enforced, as during the cell).
        self.enforcing = False

    def arm(self, limit: float | None) -> None:
        """A cell starts: kill the worker ``limit`` seconds from now unless it is seen over
        (None: no limit, no watch)."""
        with self.lock:
            self._reset_locked()
            self.enforcing = limit is not None
            if limit is None:
                return
            self.deadline = time.monotonic() + limit
            self._schedule_locked(limit, self._expired, self.generation)

    def result_arrived(self) -> None:
        """The worker says the cell ended: judge that from its CPU use from now on."""
        with self.lock:
            if self.deadline is None or self.token is None:
                return
            generation = self._reset_locked(keep_deadline=True)
            self._schedule_locked(0.0, self._first_sample, generation)

    def pause(self) -> None:
        """A command other than a cell runs (its work is not idleness): no checks until
        ``resume``."""
        with self.lock:
            self._reset_locked()

    def resume(self) -> None:
        """The command is over and nothing runs in the worker: if cells are time-limited,
        check every ``IDLE_CHECK_S`` that it stays quiet."""
        with self.lock:
            generation = self._reset_locked()
            if self.enforcing:
                self._schedule_locked(0.0, self._first_idle_sample, generation)

    def stop(self) -> None:
        """End every check for good (the worker is buried or handed to a pool)."""
        with self.lock:
            self._reset_locked()
            self.enforcing = False

    # on the deadline thread ---------------------------------------------------------

    def _expired(self, generation: int) -> None:
        with self.lock:
            if generation != self.generation:
                return
            self._reset_locked()
        self.kill("")

    def _first_sample(self, generation: int) -> None:
        cpu = tree_cpu_seconds(self.pid)
        with self.lock:
            if generation != self.generation:
                return
            if cpu is None:
                # The kernel cannot say: the result is all there is to go on.
                self._reset_locked()
                return
            self.sample = (time.monotonic(), cpu)
            self._schedule_locked(SETTLE_S, self._settle, generation)

    def _settle(self, generation: int) -> None:
        cpu = tree_cpu_seconds(self.pid)
        kill = False
        with self.lock:
            if generation != self.generation or self.sample is None:
                return
            now = time.monotonic()
            if cpu is None:
                self._reset_locked()  # gone: nothing left to kill
                return
            if _quiet(self.sample, now, cpu):
                self.sample = (now, cpu)
                self._schedule_locked(IDLE_CHECK_S, self._idle_check, generation)
                return
            self.sample = (now, cpu)
            if self.deadline is not None and now < self.deadline:
                self._schedule_locked(min(SETTLE_S, self.deadline - now), self._settle, generation)
            else:
                self._reset_locked()
                kill = True
        if kill:
            self.kill(BUSY_AFTER_RESULT)

    def _first_idle_sample(self, generation: int) -> None:
        cpu = tree_cpu_seconds(self.pid)
        with self.lock:
            if generation != self.generation or cpu is None:
                return
            self.sample = (time.monotonic(), cpu)
            self._schedule_locked(IDLE_CHECK_S, self._idle_check, generation)

    def _idle_check(self, generation: int) -> None:
        cpu = tree_cpu_seconds(self.pid)
        with self.lock:
            if generation != self.generation or self.sample is None or cpu is None:
                return
            now = time.monotonic()
            if _quiet(self.sample, now, cpu):
                self.sample = (now, cpu)
                self._schedule_locked(IDLE_CHECK_S, self._idle_check, generation)
                return
            self._reset_locked()
        self.kill(BUSY_WHILE_IDLE)

    # helpers (under the lock) -------------------------------------------------------

    def _reset_locked(self, keep_deadline: bool = False) -> int:
        if self.token is not None:
            deadlines.cancel(self.token)
            self.token = None
        self.sample = None
        if not keep_deadline:
            self.deadline = None
        self.generation += 1
        return self.generation

    def _schedule_locked(
        self, delay: float, action: Callable[[int], None], generation: int
    ) -> None:
        self.token = deadlines.arm(max(delay, 0.0), action, generation)


def _quiet(sample: tuple[float, float], now: float, cpu: float) -> bool:
    since, before = sample
    return cpu - before <= QUIET_SLACK_S + QUIET_SHARE * (now - since)
