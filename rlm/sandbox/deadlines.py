"""Host-side deadlines of the process sandbox: one thread that fires every kill on time.

The engine loop also times each cell, but a loop saturated by other envs' traffic runs
its timers late; the deadline thread does nothing else, so a kill lands when due.
``arm`` returns a token that ``cancel`` forgets. This module holds the timing only: what
an action does (kill a worker, check on it) is its caller's.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Deadlines", "arm", "cancel"]


class Deadlines:
    """One daemon thread that fires every env's kill deadline on time.

    The engine loop also times each cell, but a loop saturated by other envs' traffic
    runs its timers late; this thread does nothing else, so a kill lands when due.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int]] = []
        self.armed: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        self.seq = 0
        self.thread: threading.Thread | None = None

    def arm(self, delay: float, action: Callable[..., None], *args: Any) -> int:
        """Call ``action(*args)`` on this thread ``delay`` seconds from now; a token."""
        with self.cond:
            self.seq += 1
            token = self.seq
            self.armed[token] = (action, args)
            heapq.heappush(self.heap, (time.monotonic() + delay, token))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="rlm-deadlines", daemon=True)
                self.thread.start()
            if self.heap[0][1] == token:
                # Only a new earliest deadline changes how long the thread waits: waking
                # it for every cell (200 at a time) cost a thread switch each.
                self.cond.notify()
        return token

    def cancel(self, token: int) -> None:
        """Forget the action of ``token`` (nothing happens if it already ran)."""
        with self.cond:
            self.armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    while self.heap and self.heap[0][1] not in self.armed:
                        heapq.heappop(self.heap)
                    if not self.heap:
                        self.cond.wait()
                        continue
                    wait = self.heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
                _, token = heapq.heappop(self.heap)
                entry = self.armed.pop(token, None)
            if entry is not None:
                action, args = entry
                with contextlib.suppress(Exception):
                    action(*args)


_deadlines = Deadlines()


def arm(delay: float, action: Callable[..., None], *args: Any) -> int:
    """Call ``action(*args)`` on the deadline thread ``delay`` seconds from now; a token."""
    return _deadlines.arm(delay, action, *args)


def cancel(token: int) -> None:
    """Forget the action of ``token`` (nothing happens if it already ran)."""
    _deadlines.cancel(token)

