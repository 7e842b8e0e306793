"""Sandboxes that run REPL cells: the shared policy and two executors.

The policy, one module per concept: ``compiler`` checks and rewrites a cell under
RestrictedPython plus our rules; ``guards`` are the run-time attribute guards;
``safe_builtins``, ``jail_files`` (``open()`` by file name only) and ``modules`` (the
import allowlist and read-only module facades) make up what a namespace can reach;
``shared_state`` is the judged list of stdlib state cells can write and its clearing;
``cells`` builds the namespace, runs a cell with its deadline and output capture and
writes the error text; ``subqueries`` checks what cell code hands to llm_query;
``tools`` wraps the user's tools.

``local`` runs cells in a worker thread of this process (fast, soft limits); ``process``
runs them in a worker process (hard limits from the OS). The process sandbox, by side:

- shared by host and worker: ``wire`` (frames and control messages), ``context_codec``;
- worker side (nothing host-only imported): ``zygote`` (the template process that forks
  workers), ``preload``, ``isolation`` and ``confine`` (kernel primitives and the
  per-worker namespaces, limits and uid), ``worker_init`` (the worker's init process),
  ``worker`` (its request loop), ``worker_channel``, ``worker_session``, ``worker_reset``,
  ``watchdog``;
- host side: ``zygote_client``, ``worker_link`` and ``worker_requests`` (the channel and
  what a worker may ask), ``deadlines``, ``cell_watch`` and ``activity`` (the host decides
  when a cell is over, from what it sees), ``protections``, ``worker_resources``,
  ``host_threads``, and ``worker_pool`` (reset workers lent to the next REPLs of one owner,
  only those the host saw stay trustworthy).

Both executors implement ``Executor`` below, so ``REPLEnv`` treats them alike and the same
code behaves the same in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class CellOutcome:
    """What one executed cell produced, before REPLEnv wraps it into an ``ExecResult``.

    ``final`` is the answer given to FINAL/FINAL_VAR in this cell, or None: plain data,
    an exact str or JSON-compatible data in exact builtin types (``cells.final_value``).
    ``truncated`` is True when stdout or stderr was cut to the output cap.
    """

    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    final: Any = None
    truncated: bool = False


class SubQueries(Protocol):
    """Host-side service behind the llm_query family, shared by both executors.

    Executors never touch the client: they hand prompts here. ``batch`` never raises for
    a failed item; it puts ``"[llm_query error: ...]"`` in that slot and counts it.
    """

    async def query(self, prompt: str, params: dict[str, Any]) -> str: ...

    async def batch(self, prompts: list[str], params: dict[str, Any]) -> list[str]: ...


class Executor(Protocol):
    """Runs cells for one REPLEnv. Created unstarted; ``start`` loads context and setup code."""

    def start(self) -> None: ...

    def execute(self, code: str, timeout: float) -> CellOutcome: ...

    async def aexecute(self, code: str, timeout: float) -> CellOutcome: ...

    def get(self, name: str) -> Any: ...

    def interrupt(self, reason: str) -> None: ...

    def close(self) -> None: ...
