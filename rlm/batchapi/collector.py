"""Collecting one client's model calls into provider batches, and dispatching the results.

A ``Collector`` serves one client (one endpoint and key) through its provider's Batch
API. Each call is an ``Entry``: a key (the request's cache key, also its custom_id), the
model and a future. New entries wait as lines of an open file per model (one model per
file, as the providers require) until the file is full (the wire's line and byte
limits), its window has passed, or ``flush()`` says nothing more will come soon; then the
file is submitted as one batch and polled with backoff (about a tenth of its age, within
the settings' bounds), and its result lines are dispatched to their entries by
custom_id, since the provider does not keep order.

Request bodies are kept only until their file is submitted: an entry holds no prompt,
so thousands of waiting calls over large documents cost their keys, not their text. A
line worth retrying (a server error, a rate limit, expiry, a cancelled batch) ends its
entry with ``LineRetry``: whoever asked submits it again (``add``), and the collector
counts the tries; past ``max_tries``, or for a call first asked ``fallback_after_s`` ago,
it is sent live when the settings allow it and fails otherwise. A batch still open after
``fallback_after_s`` is cancelled so that what it had not answered goes live, never
paid twice. ``cancel()`` cancels every open batch and keeps what they had finished.

This module must not hold which task waits on what, replays or accounting
(``rlm.batchapi.replay``), nor what is written to disk (a ``Recorder`` does that).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from rlm.batchapi.settings import BatchSettings
from rlm.batchapi.wire import BatchStatus, BatchWire, LineOutcome, line_error
from rlm.errors import LLMError
from rlm.providers import Reply, Request

if TYPE_CHECKING:
    from rlm.llm import AsyncOpenAIClient

__all__ = ["Collector", "Entry", "LineRetry", "Recorder"]

log = logging.getLogger("rlm.batchapi")

# Line statuses worth submitting again (the provider's hiccup, not the request's fault).
_RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# Answered calls whose replies stay in memory for replays; older ones are read back
# from the job's reply store.
MEMORY_REPLIES = 50_000
# Full lines in a file are only this share of the provider's byte limit: the JSONL
# framing and the upload's multipart envelope need some room.
_BYTES_MARGIN = 0.98


class LineRetry(LLMError):
    """A call's line did not get an answer this time (an error worth retrying, expiry or
    a cancelled batch): submit it again."""


class Recorder(Protocol):
    """What a collector reports, so a job can keep its crash state and its cache."""

    async def submitting(self, token: str, model: str, keys: list[str],
                         tasks: list[str | None], params: list[dict[str, Any] | None]) -> None:
        """A file is about to be submitted under ``token`` (written before the create):
        its calls' keys, the task that asked each, and each one's ``Entry.params``."""

    async def submitted(self, token: str, batch_id: str) -> None:
        """The provider accepted ``token``'s file as batch ``batch_id``."""

    async def collected(self, batch_id: str, replies: Mapping[str, Reply]) -> None:
        """Batch ``batch_id`` ended and these replies came out of it."""

    async def sent_live(self, replies: Mapping[str, Reply]) -> None:
        """These calls were answered by the live API instead."""


@dataclass(eq=False)
class Entry:
    """One call in the collector: its key (its custom_id too), model and future.

    The future holds ``(reply, paid)`` with ``paid`` "batch" or "live", or an error:
    ``LineRetry`` (ask again) or the call's final ``LLMError``. ``params`` are the
    request's body without its messages (what reading a reply may need, such as a
    response format), so a waiting call does not hold its prompt.
    """

    key: str
    model: str
    future: asyncio.Future[tuple[Reply, str]]
    task: str | None = None
    batch: str | None = None
    params: dict[str, Any] | None = None

    def parse_request(self) -> Request:
        """A request to read this call's reply against (its parameters, no prompt)."""
        return Request(self.params if self.params is not None else {"model": self.model})


@dataclass
class _OpenFile:
    model: str
    entries: list[Entry] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass
class _OpenBatch:
    id: str
    model: str
    lines: dict[str, Entry]
    submitted: float  # wall clock, so a resumed job knows the age of a batch
    status: BatchStatus | None = None
    cancelling: bool = False
    to_live: bool = False  # cancelled for the live fallback: what it missed goes live
    task: asyncio.Task[None] | None = None


@dataclass
class _Tries:
    count: int = 0
    first: float = field(default_factory=time.time)
    error: LLMError | None = None
    live: bool = False


class Collector:
    """One client's calls through its provider's Batch API (engine loop only).

    ``get(key)`` is the entry of a call asked before (pending, answered or failed);
    ``add(key, request)`` asks a new one; ``adopt`` takes over a batch submitted before a
    crash; ``flush`` submits every open file now; ``cancel`` cancels open batches;
    ``aclose`` stops polling. ``counts()`` says what it did.
    """

    def __init__(self, client: AsyncOpenAIClient, wire: BatchWire, settings: BatchSettings,
                 recorder: Recorder | None = None) -> None:
        self.client = client
        self.wire = wire
        self.settings = settings
        self.recorder = recorder
        self.entries: dict[str, Entry] = {}
        self._open: dict[str, _OpenFile] = {}
        self._batches: dict[str, _OpenBatch] = {}
        self._tries: dict[str, _Tries] = {}
        self._submitting: set[asyncio.Task[None]] = set()
        self._live_queue: list[tuple[Entry, Request]] = []
        self._live_tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = dict.fromkeys(
            ("batches", "lines", "answered", "retried", "failed", "live", "cancelled"), 0)
        self._turnarounds: list[float] = []
        self._ids: list[str] = []
        self._pending = 0
        # Answered entries, oldest first: past MEMORY_REPLIES the oldest are forgotten
        # (``forget``), their replies being in the job's store by then.
        self._answered: collections.deque[str] = collections.deque()

    # -- asking ----------------------------------------------------------------------

    def _track(self, entry: Entry) -> None:
        self._pending += 1
        entry.future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[tuple[Reply, str]]) -> None:
        self._pending -= 1

    def get(self, key: str) -> Entry | None:
        """The entry of ``key`` if it was asked and is pending, answered or failed."""
        return self.entries.get(key)

    def add(self, key: str, request: Request, task: str | None = None) -> Entry:
        """Ask ``request`` (whose cache key is ``key``) and return its pending entry.

        A call that has used up its tries, or was first asked ``fallback_after_s`` ago,
        goes live when the settings allow a fallback, and otherwise fails with its last
        error.
        """
        loop = asyncio.get_running_loop()
        params = {k: v for k, v in request.body.items() if k != "messages"}
        entry = Entry(key, request.model, loop.create_future(), task, params=params)
        self.entries[key] = entry
        self._track(entry)
        tries = self._tries.get(key)
        if tries is None:
            tries = self._tries[key] = _Tries()
        settings = self.settings
        fallback = settings.fallback_after_s
        late = fallback is not None and time.time() - tries.first >= fallback
        if tries.live or late or tries.count >= settings.max_tries:
            if fallback is not None:
                self._go_live(entry, request)
            else:
                error = tries.error or LLMError(f"no answer after {tries.count} batch submissions")
                self._fail(entry, LLMError(
                    f"{error} (after {tries.count} batch submissions; set a live fallback "
                    "with --batch-fallback-after-s to send such calls live)",
                    status=error.status))
            return entry
        tries.count += 1
        self._enqueue(entry, self.wire.line(key, request))
        return entry

    def adopt(self, batch_id: str, model: str, keys: list[str], submitted: float,
              tasks: list[str | None] | None = None,
              params: list[dict[str, Any] | None] | None = None) -> None:
        """Poll and collect batch ``batch_id`` (submitted at wall time ``submitted`` by an
        earlier process), its calls pending here from now on."""
        loop = asyncio.get_running_loop()
        lines: dict[str, Entry] = {}
        for i, key in enumerate(keys):
            if key in self.entries:
                continue
            entry = Entry(key, model, loop.create_future(), tasks[i] if tasks else None, batch_id,
                          params[i] if params else None)
            self.entries[key] = entry
            self._track(entry)
            self._tries.setdefault(key, _Tries(count=1, first=submitted))
            lines[key] = entry
        batch = _OpenBatch(batch_id, model, lines, submitted)
        self._batches[batch_id] = batch
        self._ids.append(batch_id)
        batch.task = loop.create_task(self._poll(batch))

    def flush(self) -> None:
        """Submit every open file now (every caller is waiting: nothing more is coming)."""
        for model in list(self._open):
            self._submit_file(model)

    async def submitted(self) -> None:
        """Until every file handed to the provider so far is submitted (or failed to be)."""
        while self._submitting:
            await asyncio.gather(*list(self._submitting), return_exceptions=True)

    # -- state -----------------------------------------------------------------------

    @property
    def batch_ids(self) -> list[str]:
        """Every batch this collector submitted or adopted, oldest first."""
        return list(self._ids)

    @property
    def pending(self) -> int:
        """Calls asked and not yet answered or failed."""
        return self._pending

    def forget(self, keys: list[str]) -> None:
        """These calls' replies are stored: past ``MEMORY_REPLIES`` answered calls held
        here, the oldest are dropped (a later ask finds them in the store)."""
        answered = self._answered
        answered.extend(keys)
        while len(answered) > MEMORY_REPLIES:
            key = answered.popleft()
            entry = self.entries.get(key)
            if entry is not None and entry.future.done() and entry.future.exception() is None:
                del self.entries[key]

    @property
    def open_batches(self) -> int:
        """Batches submitted and not yet collected."""
        return len(self._batches)

    def oldest_open_s(self) -> float | None:
        """Age of the oldest batch still open, in seconds (None: none is open)."""
        submitted = [b.submitted for b in list(self._batches.values())]
        return time.time() - min(submitted) if submitted else None

    def typical_turnaround_s(self) -> float | None:
        """The median time from submission to results of the batches collected so far."""
        seen = sorted(self._turnarounds)
        return seen[len(seen) // 2] if seen else None

    def counts(self) -> dict[str, int]:
        """What this collector did: batches and lines submitted, lines answered, retried,
        failed and sent live, batches cancelled, and what is open now (safe to call from
        any thread)."""
        return {**self.stats, "open_batches": len(self._batches), "pending": self._pending}

    # -- files -----------------------------------------------------------------------

    def _enqueue(self, entry: Entry, line: bytes) -> None:
        wire = self.wire
        file = self._open.get(entry.model)
        if file is not None and (len(file.lines) >= wire.max_lines
                                 or file.size + len(line) + 1 > wire.max_bytes * _BYTES_MARGIN):
            self._submit_file(entry.model)
            file = None
        if file is None:
            file = self._open[entry.model] = _OpenFile(entry.model)
            file.timer = asyncio.get_running_loop().call_later(
                self.settings.window_s, self._submit_file, entry.model)
        file.entries.append(entry)
        file.lines.append(line)
        file.size += len(line) + 1

    def _submit_file(self, model: str) -> None:
        file = self._open.pop(model, None)
        if file is None or not file.entries:
            return
        if file.timer is not None:
            file.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._submit(file))
        self._submitting.add(task)
        task.add_done_callback(self._submitting.discard)

    async def _submit(self, file: _OpenFile) -> None:
        token = uuid.uuid4().hex
        keys = [e.key for e in file.entries]
        try:
            if self.recorder is not None:
                await self.recorder.submitting(token, file.model, keys,
                                               [e.task for e in file.entries],
                                               [e.params for e in file.entries])
            batch_id = await self.wire.submit(file.lines, token)
        except asyncio.CancelledError:
            for entry in file.entries:
                self._retry(entry, LineRetry("the job stopped before this call was submitted"))
            raise
        except Exception as exc:  # noqa: BLE001 - the calls are retried or fail, not the job
            error = exc if isinstance(exc, LLMError) else LLMError(f"{type(exc).__name__}: {exc}")
            log.warning("rlm batch: submitting %d %s calls failed: %s", len(keys), file.model, error)
            for entry in file.entries:
                self._retry(entry, LineRetry(f"the batch could not be submitted: {error}",
                                             status=error.status))
            return
        file.lines.clear()  # the bodies are at the provider now
        self.stats["batches"] += 1
        self.stats["lines"] += len(keys)
        batch = _OpenBatch(batch_id, file.model, {e.key: e for e in file.entries}, time.time())
        for entry in file.entries:
            entry.batch = batch_id
        self._batches[batch_id] = batch
        self._ids.append(batch_id)
        if self.recorder is not None:
            await self.recorder.submitted(token, batch_id)
        batch.task = asyncio.get_running_loop().create_task(self._poll(batch))

    # -- batches ---------------------------------------------------------------------

    def _next_wait(self, batch: _OpenBatch) -> float:
        settings = self.settings
        if batch.cancelling:
            return settings.poll_min_s
        age = time.time() - batch.submitted
        return min(settings.poll_max_s, max(settings.poll_min_s, age / 10))

    async def _poll(self, batch: _OpenBatch) -> None:
        settings = self.settings
        failures = 0
        try:
            while True:
                await asyncio.sleep(self._next_wait(batch))
                try:
                    status = await self.wire.status(batch.id)
                except LLMError as exc:
                    failures += 1
                    if failures < 5:
                        continue
                    # The batch cannot be read (gone, or the key lost access): ask again.
                    self._end_batch(batch, {}, LineRetry(f"batch {batch.id} cannot be read: {exc}"))
                    return
                failures = 0
                batch.status = status
                if status.state == "running":
                    fallback = settings.fallback_after_s
                    if (fallback is not None and not batch.cancelling
                            and time.time() - batch.submitted >= fallback):
                        batch.to_live = True
                        await self._cancel_one(batch)
                    continue
                if status.state == "failed":
                    self._end_batch(batch, {}, LineRetry(
                        f"the provider rejected batch {batch.id}: {status.error}"))
                    await self._report(batch, {})
                    return
                await self._collect(batch, status)
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad result file must not hang its callers
            log.warning("rlm batch: reading batch %s failed: %s", batch.id, exc)
            self._end_batch(batch, {}, LineRetry(f"batch {batch.id} could not be read: {exc}"))

    async def _collect(self, batch: _OpenBatch, status: BatchStatus) -> None:
        outcomes = await self.wire.results(status)
        if status.how == "cancelled":
            self.stats["cancelled"] += 1
        self._turnarounds.append(time.time() - batch.submitted)
        replies = self._dispatch(batch, outcomes)
        await self._report(batch, replies)

    async def _report(self, batch: _OpenBatch, replies: Mapping[str, Reply]) -> None:
        if self.recorder is not None:
            await self.recorder.collected(batch.id, replies)

    def _dispatch(self, batch: _OpenBatch, outcomes: list[LineOutcome]) -> dict[str, Reply]:
        adapter = self.wire.adapter
        replies: dict[str, Reply] = {}
        lines = batch.lines
        for outcome in outcomes:
            entry = lines.pop(outcome.custom_id, None)
            if entry is None or entry.future.done():
                continue
            if outcome.kind == "ok":
                try:
                    reply = adapter.parse_reply(outcome.body, entry.parse_request())
                except LLMError as exc:
                    self._fail(entry, exc)
                    continue
                replies[entry.key] = reply
                self.stats["answered"] += 1
                entry.future.set_result((reply, "batch"))
            elif outcome.kind == "error":
                error = line_error(adapter, outcome)
                if outcome.status is None or outcome.status in _RETRYABLE:
                    self._retry(entry, LineRetry(str(error), status=error.status))
                else:
                    self._fail(entry, error)
            else:
                if batch.to_live:
                    self._tries[entry.key].live = True
                self._retry(entry, LineRetry(f"the batch {outcome.kind} before this call ran"))
        self._end_batch(batch, replies, LineRetry(f"batch {batch.id} returned no line for this call"))
        return replies

    def _end_batch(self, batch: _OpenBatch, replies: Mapping[str, Reply], missing: LineRetry) -> None:
        for entry in batch.lines.values():
            if not entry.future.done():
                if batch.to_live:
                    self._tries[entry.key].live = True
                self._retry(entry, missing)
        batch.lines = {}
        self._batches.pop(batch.id, None)

    def _retry(self, entry: Entry, signal: LineRetry) -> None:
        tries = self._tries.get(entry.key)
        if tries is not None:
            tries.error = signal
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if not entry.future.done():
            self.stats["retried"] += 1
            entry.future.set_exception(signal)
            entry.future.exception()  # read: a call nobody waits for any more is no warning

    def _fail(self, entry: Entry, error: LLMError) -> None:
        self.stats["failed"] += 1
        if not entry.future.done():
            entry.future.set_exception(error)
            entry.future.exception()

    async def _cancel_one(self, batch: _OpenBatch) -> None:
        batch.cancelling = True
        try:
            await self.wire.cancel(batch.id)
        except LLMError as exc:
            log.warning("rlm batch: cancelling batch %s failed: %s", batch.id, exc)

    # -- live ------------------------------------------------------------------------

    def _go_live(self, entry: Entry, request: Request) -> None:
        self._live_queue.append((entry, request))
        if len(self._live_queue) == 1:
            # Calls going live in the same moment are sent as one concurrent batch.
            asyncio.get_running_loop().call_soon(self._send_live)

    def _send_live(self) -> None:
        queued, self._live_queue = self._live_queue, []
        if not queued:
            return
        task = asyncio.get_running_loop().create_task(self._live(queued))
        self._live_tasks.add(task)
        task.add_done_callback(self._live_tasks.discard)

    async def _live(self, queued: list[tuple[Entry, Request]]) -> None:
        replies: dict[str, Reply] = {}

        async def one(entry: Entry, request: Request) -> None:
            # A meter of its own gives this call's tokens (the client's usage counts it
            # too, at list price: it was paid live).
            meter = self.client.new_meter()
            try:
                text = await self.client.send(request, meter=meter)
            except LLMError as exc:
                self._fail(entry, exc)
                return
            used = meter.snapshot()
            model = next(iter(used.by_model), request.model)
            reply = Reply(text, model, used.prompt_tokens, used.completion_tokens,
                          used.cached_input_tokens, used.cache_creation_tokens,
                          used.reasoning_tokens)
            self.stats["live"] += 1
            replies[entry.key] = reply
            if not entry.future.done():
                entry.future.set_result((reply, "live"))

        await asyncio.gather(*(one(entry, request) for entry, request in queued))
        if replies and self.recorder is not None:
            await self.recorder.sent_live(replies)

    # -- stopping --------------------------------------------------------------------

    async def cancel(self, wait_s: float) -> None:
        """Cancel every open batch and wait up to ``wait_s`` for them to settle, so what
        they finished is kept; calls not yet submitted are dropped."""
        for file in self._open.values():
            if file.timer is not None:
                file.timer.cancel()
            for entry in file.entries:
                self._retry(entry, LineRetry("the job stopped before this call was submitted"))
        self._open.clear()
        # A submission in flight may already have made its batch at the provider:
        # cancelling the request would lose the batch's id, and the batch would run
        # (and be paid for) uncancelled. Let submissions finish, then cancel their
        # batches with the rest.
        if self._submitting:
            await asyncio.wait(list(self._submitting), timeout=wait_s)
        for task in list(self._submitting):
            task.cancel()
        batches = list(self._batches.values())
        await asyncio.gather(*(self._cancel_one(b) for b in batches if not b.cancelling))
        tasks = [b.task for b in batches if b.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)

    async def aclose(self) -> None:
        """Stop polling and submitting (open batches stay open at the provider)."""
        for file in self._open.values():
            if file.timer is not None:
                file.timer.cancel()
        tasks = [*self._submitting, *self._live_tasks,
                 *(b.task for b in self._batches.values() if b.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.wire.close()

