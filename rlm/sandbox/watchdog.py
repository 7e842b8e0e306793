"""The worker's in-process deadline: one thread that stops a running cell on time.

It calls the running cell's ``CellStop`` when its timeout is up, like the local
executor's waiting caller does; the policy's checks then end a Python-level loop and the
REPL keeps its variables. It is a courtesy, not a limit: what bounds a cell is the host's
kill (``rlm.sandbox.deadlines``), which nothing in the worker can delay. This module holds
that one thread and nothing of the channel or the cells.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Watchdog"]


class Watchdog:
    """Calls a running cell's CellStop at its deadline, like the local executor's waiter.

    The policy's checks then end a Python-level loop with CellTimeout and the REPL keeps
    its variables; a cell stuck in one C call cannot notice, and the host kills the
    whole worker a moment later.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.stop: Callable[[str], None] | None = None
        self.deadline = 0.0
        self.reason = ""
        self.thread: threading.Thread | None = None

    def arm(self, stop: Callable[[str], None], timeout: float | None, reason: str) -> None:
        """Call ``stop(reason)`` ``timeout`` seconds from now (no timeout: never)."""
        if timeout is None:
            return
        with self.cond:
            self.stop, self.deadline, self.reason = stop, time.monotonic() + timeout, reason
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="rlm-watchdog", daemon=True)
                self.thread.start()
            self.cond.notify()

    def disarm(self) -> None:
        """The cell is over: forget its stop."""
        with self.cond:
            self.stop = None

    def _watch(self) -> None:
        while True:
            with self.cond:
                while self.stop is None or time.monotonic() < self.deadline:
                    if self.stop is None:
                        self.cond.wait()
                    else:
                        self.cond.wait(max(self.deadline - time.monotonic(), 0.0))
                stop, reason, self.stop = self.stop, self.reason, None
            stop(reason)
