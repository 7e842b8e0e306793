"""Thread pools for the process sandbox's blocking host steps, apart from any event loop's.

Spawning, reaping and tool calls run on pools of their own, never on the running loop's
default executor: callers park threads of that executor while they wait for an env to
start (RLM runs create envs with ``asyncio.to_thread``), and if those threads were also
the only ones that could do the start, a few concurrent runs would deadlock. This module
holds the pools only, not the work done on them.
"""

from __future__ import annotations

import concurrent.futures
import threading

__all__ = ["host_pool", "tool_pool"]

_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"rlm-sandbox-{name}"
            )
        return pool


def host_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Short blocking steps of the host: asking the zygote to fork, killing and reaping."""
    return _pool("host", 16)


def tool_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Sync tool functions called from cells (they may block for as long as they like)."""
    return _pool("tools", 32)
