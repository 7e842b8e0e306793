"""What the host sees of a worker by itself: the CPU time its whole process tree used.

Read from the kernel (``/proc``), never from the worker: starting at the worker's init
(the pid the host holds), every descendant is found through each thread's ``children``
list and its user and system time summed, with the time of children it already reaped.
A worker cannot make this smaller than it is. Where ``/proc`` cannot say (macOS, a
kernel without the ``children`` lists), the answer is None. This module only reads; what
the numbers mean for a worker is ``cell_watch``'s decision.
"""

from __future__ import annotations

import os

__all__ = ["tree_cpu_seconds"]

# A worker's tree is small (RLIMIT_NPROC); a walk never visits more than this.
_MAX_PROCESSES = 4096

try:
    _TICK = float(os.sysconf("SC_CLK_TCK"))
except (AttributeError, ValueError, OSError):
    _TICK = 100.0


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds used so far by process ``pid`` and every descendant; None if unknown
    (``pid`` is gone or ``/proc`` does not show it)."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        return None  # no children lists here: the tree cannot be walked
    total = 0.0
    todo = [pid]
    seen = 0
    while todo and seen < _MAX_PROCESSES:
        current = todo.pop()
        seen += 1
        used = _process_cpu(current)
        if used is None:
            if current == pid:
                return None
            continue  # a descendant that just exited: its parent counts it once reaped
        total += used
        todo.extend(_children(current))
    return total


def _process_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after
    # the last ')'; utime, stime, cutime and cstime are fields 14 to 17.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return sum(int(x) for x in fields[11:15]) / _TICK
    except (ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return found
