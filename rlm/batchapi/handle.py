"""The low-level Batch API of one client: ``submit_batch(requests) -> BatchHandle``.

``AsyncOpenAIClient.submit_batch`` submits a list of requests now (grouped into batch
files by model, split at the provider's limits) and returns a ``BatchHandle``;
``await handle.results()`` polls until every request has an outcome, submits again the
lines that failed for a reason worth retrying, and returns the replies in order.
``completion_batch(prompts, batch_api=True)`` is the same with the client's reply cache
in front. Replies are counted in the client's usage at the batch price. This module
must not hold the batches' lifecycle (``collector``) or a job's replays (``replay``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rlm import loop as engine
from rlm.batchapi.collector import Collector, Entry, LineRetry
from rlm.batchapi.settings import BatchSettings
from rlm.batchapi.wire import wire_for
from rlm.cache import request_key
from rlm.errors import BatchError
from rlm.providers import Reply, Request

if TYPE_CHECKING:
    from rlm.llm import AsyncOpenAIClient

__all__ = ["BatchHandle", "complete_through_batches", "on_engine"]

T = TypeVar("T")


async def on_engine(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` run on rlm's engine loop (where the collectors live), from any loop."""
    loop = engine.engine_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    with engine.waking():
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


class BatchHandle:
    """Requests submitted to a provider's Batch API through one client.

    ``ids`` are the provider's batch ids so far (more appear when lines are retried);
    ``await results()`` returns the reply texts in the order of the requests (a failed
    request raises ``BatchError`` with the rest, or is its exception in place with
    ``return_exceptions=True``); ``await status()`` counts lines; ``await cancel()``
    cancels what is still open and keeps what finished; ``await close()`` stops
    polling (``results`` closes it too).
    """

    def __init__(self, client: AsyncOpenAIClient, collector: Collector,
                 requests: Sequence[Request]) -> None:
        self._client = client
        self._collector = collector
        self._requests = list(requests)
        self._ids: list[str] = []
        self._entries: list[Entry] = []
        self._done: list[Any] = [None] * len(self._requests)
        self._closed = False

    @classmethod
    async def open(cls, client: AsyncOpenAIClient, requests: Sequence[Request],
                   settings: BatchSettings | None = None) -> BatchHandle:
        """Submit ``requests`` through ``client``'s provider (on rlm's engine loop)."""
        settings = settings or BatchSettings()
        collector = Collector(client, wire_for(client.provider_adapter()), settings)
        handle = cls(client, collector, requests)
        for i, request in enumerate(handle._requests):
            key = request_key(client.base_url, request.body) if request.cache else None
            handle._ids.append(key or uuid.uuid4().hex)
            handle._entries.append(handle._ask(i))
        collector.flush()
        await collector.submitted()
        return handle

    def _ask(self, i: int) -> Entry:
        collector = self._collector
        key = self._ids[i]
        entry = collector.get(key)
        if entry is None:  # new, or its last line is to be submitted again
            entry = collector.add(key, self._requests[i])
        return entry

    @property
    def ids(self) -> list[str]:
        """The provider's ids of the batches submitted for these requests so far."""
        return self._collector.batch_ids

    async def status(self) -> dict[str, int]:
        """Lines submitted, answered, retried, failed and sent live, and open batches."""
        return self._collector.counts()

    async def results(self, *, return_exceptions: bool = False) -> list[Any]:
        """The reply texts in order, once every request has an outcome (see the class)."""
        replies = await on_engine(self._gather())
        if return_exceptions:
            return [r.text if isinstance(r, Reply) else r for r in replies]
        errors = {i: r for i, r in enumerate(replies) if isinstance(r, BaseException)}
        texts = [None if i in errors else r.text for i, r in enumerate(replies)]
        if errors:
            raise BatchError(texts, errors)
        return texts

    async def _gather(self) -> list[Any]:
        collector = self._collector
        try:
            while True:
                waiting = [e.future for e in self._entries if not e.future.done()]
                if waiting:
                    await asyncio.wait(waiting)
                again = False
                for i, entry in enumerate(self._entries):
                    if self._done[i] is not None:
                        continue
                    error = entry.future.exception()
                    if isinstance(error, LineRetry):
                        self._entries[i] = self._ask(i)
                        again = True
                    elif error is not None:
                        self._done[i] = error
                    else:
                        reply, paid = entry.future.result()
                        if paid == "batch" and all(e is not entry for e in self._entries[:i]):
                            self._client.count_call(reply, batch=True)
                        self._done[i] = reply
                if not again:
                    return list(self._done)
                collector.flush()
                await collector.submitted()
        finally:
            await self._close()

    async def cancel(self) -> None:
        """Cancel the batches still open; lines they finished stay answered."""
        await on_engine(self._collector.cancel(self._collector.settings.cancel_wait_s))

    async def close(self) -> None:
        """Stop polling (open batches stay open at the provider)."""
        await on_engine(self._close())

    async def _close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._collector.aclose()


async def complete_through_batches(
    client: AsyncOpenAIClient, requests: list[Request],
    on_item_done: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """``completion_batch(..., batch_api=True)`` on the engine loop: the client's cache
    answers what it can, the rest goes through one ``BatchHandle``, and the new replies
    are stored in the cache."""
    total = len(requests)
    results: list[Any] = [None] * total
    cache = client.reply_cache
    todo = list(range(total))
    keys: list[str | None] = [None] * total
    if cache is not None and cache.read:
        keys, known = await cache.prepare(client.base_url, [r.body for r in requests])
        todo = []
        for i, key in enumerate(keys):
            hit = known.get(key) if key is not None and requests[i].cache else None
            if hit is None:
                todo.append(i)
            else:
                results[i] = hit.text
    if on_item_done is not None and total - len(todo):
        on_item_done(total - len(todo), total)
    if not todo:
        return results
    handle = await BatchHandle.open(client, [requests[i] for i in todo])
    outcomes = await handle._gather()
    fresh: dict[str, Reply] = {}
    for i, outcome in zip(todo, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            results[i] = outcome
            continue
        results[i] = outcome.text
        key = keys[i]
        if key is not None and requests[i].cache:
            fresh[key] = outcome
    store = cache.store if cache is not None and cache.write else None
    if store is not None and fresh:
        await asyncio.to_thread(store.put_many, fresh)
    if on_item_done is not None:
        on_item_done(total, total)
    return results
