"""Per-env caps on sub-queries, and the flow control that keeps one env from flooding the host.

Every REPL env, in either sandbox, reaches the host's sub-query service through one
``SubQueryGate``. It enforces three caps, each named in the error a cell gets:

- ``max_batch_items``: prompts in one ``llm_query_batch`` call;
- ``max_prompt_bytes``: UTF-8 bytes of one prompt;
- ``max_in_flight``: sub-queries of this env running at once. A batch larger than that
  is not refused: its items are fetched slice by slice as earlier ones finish, so host
  memory holds at most ``max_in_flight`` prompts (and about ``IN_FLIGHT_BYTES`` of
  them) whatever the batch size. Single queries beyond the cap wait, up to as many
  again; past that they fail at once.

The process sandbox checks the same caps in the worker before anything is sent, and the
host pulls a batch's prompts from the worker only as slots free up (``run_batch`` with a
fetch callback), so a million-item batch never exists on the host.

All envs share one engine loop, and a loop busy with one env's replies delays every
other caller. So the window of an env with many sub-queries in flight also follows the
loop's lag (sampled while any gate has work): it shrinks while the loop runs late and
grows back while it keeps time, never below ``WINDOW_FLOOR``, which a light env never
reaches. Alone on an idle loop, an env gets its whole ``max_in_flight``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rlm.errors import ConfigError
from rlm.sandbox.subqueries import LLMQueryError, check_subquery_prompt

__all__ = [
    "IN_FLIGHT_BYTES",
    "SubQueryGate",
    "SubQueryLimits",
    "check_batch_size",
    "check_prompt_size",
    "max_frame_bytes",
    "prompt_bytes",
]

# Prompt bytes of one env on the host at once (running plus waiting); at least one
# prompt of the maximum size always fits.
IN_FLIGHT_BYTES = 96 << 20

# The loop-lag feedback: sample period, the lag an env's window is shrunk for, and the
# window below which it is never shrunk.
LAG_PERIOD_S = 0.05
LAG_TARGET_S = 0.015
WINDOW_FLOOR = 16

NO_CLIENT = (
    "no model client is configured for this REPL, so llm_query cannot run: create it "
    "with REPLEnv(context, client=AsyncOpenAIClient(...))"
)


@dataclass(frozen=True)
class SubQueryLimits:
    """The caps of one env (see the module docstring); REPLEnv options of the same names."""

    max_batch_items: int = 100_000
    max_prompt_bytes: int = 4 << 20
    max_in_flight: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_batch_items", "max_prompt_bytes", "max_in_flight"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, not {value!r}")

    @property
    def in_flight_bytes(self) -> int:
        """Prompt bytes an env may hold on the host at once."""
        return max(IN_FLIGHT_BYTES, self.max_prompt_bytes)

    def slice_items(self, n: int) -> int:
        """Most items of an ``n``-prompt batch fetched and sent to the service together.

        A batch that fits in ``max_in_flight`` goes to the service as one call, exactly as
        without the gate; a bigger one in quarters of the window, so slots freed by one
        slice are refilled while the others still run.
        """
        return n if n <= self.max_in_flight else max(1, self.max_in_flight // 4)

    def as_dict(self) -> dict[str, int]:
        return {
            "max_batch_items": self.max_batch_items,
            "max_prompt_bytes": self.max_prompt_bytes,
            "max_in_flight": self.max_in_flight,
        }


def max_frame_bytes(limits: SubQueryLimits) -> int:
    """The largest message a worker may send the host: one prompt JSON-escaped, and room.

    JSON escaping can grow text sixfold (control characters); the host refuses, and
    kills, a worker announcing anything larger before reading it.
    """
    return max(16 << 20, 6 * limits.max_prompt_bytes + (1 << 20))


def prompt_bytes(prompt: Any) -> int:
    """UTF-8 size of a prompt: a str's bytes, or a message list's JSON."""
    if isinstance(prompt, str):
        if prompt.isascii():
            return len(prompt)
        return len(prompt.encode("utf-8", "surrogatepass"))
    try:
        return len(json.dumps(prompt, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        return 0  # not a prompt at all: check_subquery_prompt says so


def check_batch_size(count: int, limits: SubQueryLimits) -> None:
    """Refuse a batch of more than ``max_batch_items`` prompts, saying how to change it."""
    if count > limits.max_batch_items:
        raise LLMQueryError(
            f"llm_query_batch got {count:,} prompts; this REPL takes at most "
            f"{limits.max_batch_items:,} per call (max_batch_items). Split the list into "
            "smaller batches, or create the REPLEnv with a larger max_batch_items"
        )


def check_prompt_size(size: int, limits: SubQueryLimits, index: int | None = None) -> None:
    """Refuse a prompt of more than ``max_prompt_bytes`` UTF-8 bytes, saying how to change it."""
    if size > limits.max_prompt_bytes:
        which = "a prompt" if index is None else f"prompt {index}"
        raise LLMQueryError(
            f"llm_query: {which} is {size:,} bytes; this REPL sends at most "
            f"{limits.max_prompt_bytes:,} bytes per prompt (max_prompt_bytes). Send a "
            "smaller slice, or create the REPLEnv with a larger max_prompt_bytes"
        )


class _LoopLag:
    """How late the engine loop runs its timers, sampled only while some gate has work.

    One per loop. ``seq`` counts samples so each gate reacts to each sample once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lag = 0.0
        self.seq = 0
        self.busy = 0
        self.task: asyncio.Task[None] | None = None

    def hold(self) -> None:
        self.busy += 1
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._sample())

    def let_go(self) -> None:
        self.busy -= 1

    async def _sample(self) -> None:
        # Ends when no gate has work, so no task outlives the traffic (or the loop).
        while self.busy > 0:
            due = self.loop.time() + LAG_PERIOD_S
            await asyncio.sleep(LAG_PERIOD_S)
            self.lag = max(0.0, self.loop.time() - due)
            self.seq += 1
        self.lag = 0.0


_lags: dict[asyncio.AbstractEventLoop, _LoopLag] = {}


def _loop_lag() -> _LoopLag:
    loop = asyncio.get_running_loop()
    lag = _lags.get(loop)
    if lag is None:
        for old in [other for other in _lags if other.is_closed()]:
            del _lags[old]
        lag = _lags[loop] = _LoopLag(loop)
    return lag


Fetch = Callable[[int, int, int], Awaitable[list[Any]]]
Deliver = Callable[[int, list[Any]], None]


class SubQueryGate:
    """The ``SubQueries`` service an executor gets: the env's caps in front of the real one.

    Lives on the engine loop (no locks). ``inner`` may be None (no client configured):
    every call then fails with a message saying how to configure one.
    """

    def __init__(self, inner: Any, limits: SubQueryLimits | None = None) -> None:
        self.inner = inner
        self.limits = limits or SubQueryLimits()
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.waiting = 0
        self.waiting_bytes = 0
        # The env's current window (<= max_in_flight), following the loop's lag.
        self.window = float(self.limits.max_in_flight)
        self._lag_seen = 0
        self._waiters: collections.deque[tuple[asyncio.Future[None], int, int]] = (
            collections.deque()
        )

    # the SubQueries protocol ----------------------------------------------------------

    async def query(self, prompt: Any, params: dict[str, Any]) -> Any:
        """One sub-query, once the env has a free slot (refused if too many already wait)."""
        size = prompt_bytes(prompt)
        check_prompt_size(size, self.limits)
        service = self._service()
        if not self._free(1, size):
            limits = self.limits
            if (
                self.waiting >= limits.max_in_flight
                or self.waiting_bytes + size > limits.in_flight_bytes
            ):
                raise LLMQueryError(
                    f"llm_query: {self.in_flight:,} sub-queries of this REPL are running and "
                    f"{self.waiting:,} more are waiting, the most max_in_flight="
                    f"{limits.max_in_flight:,} allows. Use llm_query_batch for many prompts, "
                    "or create the REPLEnv with a larger max_in_flight"
                )
        self.waiting += 1
        self.waiting_bytes += size
        try:
            await self._acquire(1, size)
        finally:
            self.waiting -= 1
            self.waiting_bytes -= size
        try:
            return await service.query(prompt, params)
        finally:
            self._give(1, size)

    async def batch(self, prompts: list[Any], params: dict[str, Any]) -> list[Any]:
        """Many sub-queries in order; at most ``max_in_flight`` of them at once."""
        check_batch_size(len(prompts), self.limits)
        sizes = [prompt_bytes(p) for p in prompts]
        for i, size in enumerate(sizes):
            check_prompt_size(size, self.limits, i)
        results: list[Any] = [None] * len(prompts)

        async def fetch(start: int, count: int, budget: int) -> list[Any]:
            end, used = start, 0
            while end < start + count and (end == start or used + sizes[end] <= budget):
                used += sizes[end]
                end += 1
            return prompts[start:end]

        def deliver(start: int, replies: list[Any]) -> None:
            results[start : start + len(replies)] = replies

        await self.run_batch(len(prompts), fetch, deliver, params)
        return results

    # the pipelined batch ---------------------------------------------------------------

    async def run_batch(self, n: int, fetch: Fetch, deliver: Deliver, params: dict[str, Any]) -> None:
        """Run ``n`` prompts obtained slice by slice: ``fetch(start, count, byte_budget)``
        returns 1..count prompts from ``start`` (at least one even over budget), and
        ``deliver(start, replies)`` takes each slice's replies as it finishes.

        A slice is fetched only when the env has room for it, so what the host holds is
        bounded by the caps, not by ``n``. If one slice's service call raises, the rest
        is cancelled and the error propagates.
        """
        check_batch_size(n, self.limits)
        service = self._service()
        limits = self.limits
        tasks: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []
        start = 0
        try:
            while start < n and not failure:
                # One slot first (waiting in line with the env's other requests), then
                # whatever else is free, reserved before the (possibly remote) fetch so
                # concurrent batches of this env cannot overshoot the caps meanwhile.
                await self._acquire(1, 0)
                extra = min(limits.slice_items(n), n - start, self._window() - self.in_flight)
                extra = max(extra - 1, 0)
                budget = max(limits.in_flight_bytes - self.in_flight_bytes, 1)
                self._take(extra, budget)
                count = extra + 1
                try:
                    items = await fetch(start, count, budget)
                    if not isinstance(items, list) or not 1 <= len(items) <= count:
                        raise LLMQueryError("llm_query_batch: the prompts could not be read")
                    sizes = [prompt_bytes(p) for p in items]
                    for i, (item, size) in enumerate(zip(items, sizes, strict=True)):
                        check_subquery_prompt(item)
                        check_prompt_size(size, limits, start + i)
                except BaseException:
                    self._give(count, budget)
                    raise
                used = sum(sizes)
                self._give(count - len(items), budget - used)
                task = asyncio.get_running_loop().create_task(
                    self._run_slice(service, start, items, params, deliver, failure)
                )
                # The slice's room goes back when its task is done in any way: a task
                # cancelled before it started never runs its coroutine's finally.
                task.add_done_callback(functools.partial(self._slice_done, len(items), used))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                start += len(items)
            while tasks and not failure:
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
            if failure:
                raise failure[0]
        finally:
            for task in tasks:
                task.cancel()

    async def _run_slice(
        self,
        service: Any,
        start: int,
        items: list[Any],
        params: dict[str, Any],
        deliver: Deliver,
        failure: list[BaseException],
    ) -> None:
        try:
            replies = await service.batch(items, params)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to run_batch, which raises it
            failure.append(exc)
            return
        deliver(start, replies)

    def _slice_done(self, items: int, size: int, _task: asyncio.Task[None]) -> None:
        self._give(items, size)

    # slots ---------------------------------------------------------------------------

    def _service(self) -> Any:
        if self.inner is None:
            raise LLMQueryError(NO_CLIENT)
        return self.inner

    def _room(self, items: int, size: int) -> bool:
        if self.in_flight == 0:
            return True
        limits = self.limits
        return (
            self.in_flight + items <= self._window()
            and self.in_flight_bytes + size <= limits.in_flight_bytes
        )

    def _window(self) -> int:
        """``max_in_flight``, shrunk while the shared loop runs late (see module doc)."""
        lag = _lags.get(asyncio.get_running_loop())
        if lag is not None and lag.seq != self._lag_seen:
            self._lag_seen = lag.seq
            top = float(self.limits.max_in_flight)
            if lag.lag > LAG_TARGET_S and self.in_flight > WINDOW_FLOOR:
                self.window = max(float(WINDOW_FLOOR), min(self.window, self.in_flight) * 0.7)
            elif lag.lag < LAG_TARGET_S / 2:
                self.window = min(top, self.window * 1.1 + 1)
        return max(1, int(self.window))

    def _free(self, items: int, size: int) -> bool:
        """Would ``_acquire`` succeed at once (room, and nobody waiting before us)?"""
        return not self._waiters and self._room(items, size)

    async def _acquire(self, items: int, size: int) -> None:
        """Reserve room for ``items`` prompts of ``size`` bytes, in arrival order."""
        if self._free(items, size):
            self._take(items, size)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, items, size))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._give(items, size)  # granted, but we are gone: pass it on
            raise

    def _take(self, items: int, size: int) -> None:
        if self.in_flight == 0 and items:
            _loop_lag().hold()
        self.in_flight += items
        self.in_flight_bytes += size

    def _give(self, items: int, size: int) -> None:
        self.in_flight -= items
        self.in_flight_bytes -= size
        if self.in_flight == 0 and items:
            _loop_lag().let_go()
        self._grant()

    def _grant(self) -> None:
        # Hand room to waiters in order; each grant is reserved here, atomically.
        waiters = self._waiters
        while waiters:
            fut, items, size = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if not self._room(items, size):
                return
            waiters.popleft()
            self._take(items, size)
            fut.set_result(None)
