"""The host's own judgement of when a worker's cell is over: a kill a frame cannot disarm.

A worker's ``result`` frame only *says* the cell ended; code that escaped the policy can
send one and keep running. So a ``CellWatch`` leaves the wall-clock kill armed when the
result arrives. At the kill's deadline, a worker with no result is killed as before; one
that reported its result is checked instead: the host samples the CPU time of its
process tree (``activity``, read from the kernel) over ``SETTLE_S`` and kills it if it
is busy (more than ``QUIET_SLACK_S`` plus ``QUIET_SHARE`` of the time passed). A quiet
worker is then checked the same way every ``IDLE_CHECK_S`` until its next command, so
one that starts working later, while no cell runs, is killed too. A new cell re-arms
the watch, so a REPL that keeps its worker busy with cells costs no /proc reads at all.

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
    ran past its deadline without a result, else why a worker that claimed to be done
    was killed. Thread-safe; ``stop`` ends every check (the worker is gone or handed
    over).
    """

    def __init__(self, pid: int, kill: Callable[[str], None]) -> None:
        self.pid = pid
        self.kill = kill
        self.lock = threading.Lock()
        self.generation = 0
        self.token: int | None = None
        self.result_seen = False
        self.sample: tuple[float, float] | None = None
        # Set by a cell with a time limit: from then on idleness is checked between
        # commands too (without a limit nothing is enforced, as during the cell).
        self.enforcing = False

    def arm(self, limit: float | None) -> None:
        """A cell starts: at ``limit`` seconds from now, kill the worker unless it reported
        its result and is seen quiet (None: no limit, no watch)."""
        with self.lock:
            generation = self._reset_locked()
            self.enforcing = limit is not None
            if limit is not None:
                self._schedule_locked(limit, self._due, generation)

    def result_arrived(self) -> None:
        """The worker says the cell ended: noted, and judged when the kill is due."""
        with self.lock:
            self.result_seen = True

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
                self._schedule_locked(SETTLE_S, self._first_idle_sample, generation)

    def stop(self) -> None:
        """End every check for good (the worker is buried or handed to a pool)."""
        with self.lock:
            self._reset_locked()
            self.enforcing = False

    # on the deadline thread ---------------------------------------------------------

    def _due(self, generation: int) -> None:
        """The kill's deadline: no result yet means a kill; a result, a look first."""
        with self.lock:
            if generation != self.generation:
                return
            if not self.result_seen:
                self._reset_locked()
                kill = True
            else:
                kill = False
        if kill:
            self.kill("")
            return
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
        self._check(generation, BUSY_AFTER_RESULT)

    def _first_idle_sample(self, generation: int) -> None:
        cpu = tree_cpu_seconds(self.pid)
        with self.lock:
            if generation != self.generation or cpu is None:
                return
            self.sample = (time.monotonic(), cpu)
            self._schedule_locked(IDLE_CHECK_S, self._idle_check, generation)

    def _idle_check(self, generation: int) -> None:
        self._check(generation, BUSY_WHILE_IDLE)

    def _check(self, generation: int, reason: str) -> None:
        """Kill the worker if it was busy since the last sample, else look again later."""
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
        self.kill(reason)

    # helpers (under the lock) -------------------------------------------------------

    def _reset_locked(self) -> int:
        if self.token is not None:
            deadlines.cancel(self.token)
            self.token = None
        self.sample = None
        self.result_seen = False
        self.generation += 1
        return self.generation

    def _schedule_locked(
        self, delay: float, action: Callable[[int], None], generation: int
    ) -> None:
        self.token = deadlines.arm(max(delay, 0.0), action, generation)


def _quiet(sample: tuple[float, float], now: float, cpu: float) -> bool:
    since, before = sample
    return cpu - before <= QUIET_SLACK_S + QUIET_SHARE * (now - since)
