"""REPL sessions an agent drives directly: open, execute cells, close.

The agent is the root model here: it writes the cells, and ``llm_query_batch`` in them
fans out through the server's one sub-model client. Sessions are capped in number, closed
after an idle timeout (a busy one never is), and what a cell returns is cut to a budget
so one ``print(context)`` cannot flood the agent's window. Each session spends from its
own budget ledger with the server's caps (``max_tokens``, ``max_cost_usd``), as a run
does, and belongs to the client session that opened it: to any other, its id is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from rlm.errors import SessionError
from rlm.llm import AsyncOpenAIClient
from rlm.repl import ClientSubQueries, ExecResult, REPLEnv, describe_context
from rlm.usage import BudgetLedger

__all__ = ["SessionManager", "fit_output"]

Progress = Callable[[int, int], None]


@dataclass
class _Session:
    env: REPLEnv
    sub_queries: ClientSubQueries
    description: str
    # Who opened it: only requests from the same owner find it.
    owner: str | None
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    # One cell at a time per session, so the progress hook belongs to the running cell.
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    note = f"\n... [{len(text) - limit:,} chars cut] ...\n"
    keep = max(0, limit - len(note))
    head = keep * 2 // 3
    return text[:head] + note + text[len(text) - (keep - head):]


def fit_output(result: ExecResult, budget: int) -> dict[str, Any]:
    """A cell's outcome as a JSON-ready dict whose texts together fit in ``budget`` chars.

    The error (what the agent most needs) is kept first, up to a quarter of the budget;
    stdout and stderr share the rest, each cut in the middle (head and tail kept).
    """
    error = _cut(result.error, budget // 4) if result.error else None
    remaining = budget - len(error or "")
    stdout, stderr = result.stdout, result.stderr
    cut = result.truncated
    if len(stdout) + len(stderr) > remaining:
        cut = True
        err_share = min(len(stderr), max(remaining - len(stdout), remaining // 3))
        stdout, stderr = _cut(stdout, remaining - err_share), _cut(stderr, err_share)
    return {
        "stdout": stdout,
        "stderr": stderr,
        "error": error,
        "final": result.final,
        "sub_calls": result.sub_calls,
        "duration_s": round(result.duration_s, 4),
        "truncated": cut,
    }


class SessionManager:
    """Open REPL sessions keyed by unguessable ids, over one shared sub-model client.

    ``max_sessions`` may be open at once; a session idle for ``idle_timeout_s`` is closed
    by ``reaper()``. Cells run under ``sandbox`` with ``cell_timeout_s`` each; what one
    returns is cut to ``max_output_chars``. Each session's sub-queries spend from a ledger
    of their own limited to ``max_tokens`` and ``max_cost_usd``. ``owner`` (e.g. the
    client's protocol session id) binds a session to whoever opened it; another owner
    gets the unknown-id error for it, so an id seen by one client is no key for another.
    """

    def __init__(
        self,
        client: AsyncOpenAIClient,
        *,
        sandbox: str,
        max_sessions: int = 8,
        idle_timeout_s: float = 900.0,
        max_output_chars: int = 20_000,
        cell_timeout_s: float = 120.0,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
    ) -> None:
        self._client = client
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.sandbox = sandbox
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.max_output_chars = max_output_chars
        self.cell_timeout_s = cell_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._opening = 0

    def __len__(self) -> int:
        return len(self._sessions)

    async def open(self, context: Any, owner: str | None = None) -> tuple[str, str]:
        """Start a session holding ``context`` for ``owner``; returns its id and the
        context's description."""
        await self.reap()
        if len(self._sessions) + self._opening >= self.max_sessions:
            raise SessionError(
                f"too many open REPL sessions ({self.max_sessions}): close one with repl_close, or "
                f"wait for idle ones to expire (after {self.idle_timeout_s:g} s idle)"
            )
        self._opening += 1
        try:
            ledger = BudgetLedger(max_tokens=self.max_tokens, max_cost_usd=self.max_cost_usd,
                                  prices=self._client.prices, name="session")
            sub_queries = ClientSubQueries(self._client, ledger)
            # Starting a worker process blocks for a moment: keep the server's loop free.
            env = await asyncio.to_thread(
                REPLEnv,
                context,
                sandbox=self.sandbox,
                timeout=self.cell_timeout_s,
                max_output_chars=self.max_output_chars,
                sub_queries=sub_queries,
            )
        finally:
            self._opening -= 1
        session_id = secrets.token_urlsafe(16)
        self._sessions[session_id] = _Session(env, sub_queries, describe_context(context), owner)
        return session_id, self._sessions[session_id].description

    def _get(self, session_id: str, owner: str | None = None) -> _Session:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionError(
                f"no open REPL session {session_id!r}: it was closed or expired after "
                f"{self.idle_timeout_s:g} s idle; open a new one with repl_open"
            )
        return session

    async def execute(self, session_id: str, code: str, progress: Progress | None = None,
                      owner: str | None = None) -> dict[str, Any]:
        """Run one cell in ``owner``'s session; ``progress(done, total)`` hears its batches."""
        session = self._get(session_id, owner)
        session.busy += 1
        try:
            async with session.turn:
                session.sub_queries.progress = progress
                try:
                    result = await session.env.aexecute(code)
                finally:
                    session.sub_queries.progress = None
        finally:
            session.busy -= 1
            session.last_used = time.monotonic()
        return fit_output(result, self.max_output_chars)

    async def close(self, session_id: str, owner: str | None = None) -> None:
        """Close ``owner``'s session and stop its worker."""
        self._get(session_id, owner)  # raises the helpful error for an unknown id
        await self._drop(session_id)

    async def _drop(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            await asyncio.to_thread(session.env.close)

    async def reap(self) -> int:
        """Close sessions idle past the timeout; returns how many were closed."""
        now = time.monotonic()
        stale = [sid for sid, s in self._sessions.items()
                 if not s.busy and now - s.last_used > self.idle_timeout_s]
        for sid in stale:
            await self._drop(sid)
        return len(stale)

    @contextlib.asynccontextmanager
    async def reaping(self) -> AsyncIterator[None]:
        """Reap idle sessions in the background while the block runs; close all at the end."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(max(0.05, min(self.idle_timeout_s / 4, 30.0)))
                await self.reap()

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.aclose()

    async def aclose(self) -> None:
        """Close every session."""
        for sid in list(self._sessions):
            await self._drop(sid)
