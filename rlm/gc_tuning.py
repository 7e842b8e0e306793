"""Fewer full garbage collections while much short-lived work is in flight.

Holds :func:`fewer_full_collections`, which the client uses around a large batch and a
job around its runs. Thousands of requests or hundreds of RLM runs in flight each keep
their objects alive for a latency or a run, long enough to be counted toward full
collections, and every full collection rescans all of them: CPython spent 60% of the
client's CPU so on a batch of 10,000 requests (benchmarks/fanout.py) and 2.2 ms per task
of a 1,000-task job at 200 at a time (benchmarks/many_tasks.py --chunked), both timed
with gc callbacks. It must not hold anything but the collector's thresholds.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["MANY_RUNS", "fewer_full_collections"]

# From this many RLM runs at a time, a job or a batch of runs holds full collections
# back while it runs: 200 in flight made them cost 2.2 ms of CPU per task.
MANY_RUNS = 16

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def fewer_full_collections(active: bool = True) -> Iterator[None]:
    """Raise the collector's thresholds while the block runs (nothing when ``active`` is
    False): young objects are collected after 50,000 allocations instead of 700, and a
    full collection comes a tenth as often. The collector stays on, and the thresholds
    saved at the first holder come back when the last one (on any thread) leaves.
    """
    global _holders, _saved
    if not active:
        yield
        return
    with _lock:
        if _holders == 0:
            _saved = gc.get_threshold()
            t0, t1, t2 = _saved
            gc.set_threshold(max(t0, 50_000), t1, max(t2, 100))
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None
