"""Batch mode's waiting: a task parks on its first unanswered call and is replayed later.

A batch answers in minutes or hours, and a job may have thousands of tasks waiting at
once: each holding a sandbox worker (a process, its memory, the context it was sent)
for that long would not fit on a host. So a waiting task holds nothing. Each try of a
task (an ``Attempt``) runs the task from the start; every model call it makes goes to
its client's ``ClientRoute`` (the client's Batch API hook, see ``rlm.llm``), which
answers it from what the job already has (replies of earlier batches, the reply store
of earlier runs) or, the first time, adds it to a provider batch and raises
``BatchPending``. The try then stops: once a pending call was handed back to the run's
code, the route submits nothing new for it (the code may be acting on a missing
answer), the run ends, its sandbox goes back to the pool and its result is dropped.
When every call it waited on is answered, the task is run again; calls made before are
answered at once, so it gets one step further each time, until it finishes.

The trade-off, against keeping each waiting task's REPL (or a snapshot of its
variables): memory and processes stay bounded by the tries running at once, whatever
the number of waiting tasks, and nothing about a REPL has to survive a wait (or a
crash: a re-run replays from the reply store); the price is CPU, since a task with S
steps runs its first cells up to S times (S(S+1)/2 cell runs instead of S). A cell
whose output changes from run to run (set order, unseeded random, the clock) may ask
different questions on a replay: the job seeds each task's ``random`` the same way on
every try, and a task whose replays stop getting further (``max_replays``) is finished
on the live API instead.

Accounting follows what was paid: a call answered by a batch counts at the batch price
in the run's usage on every try that uses it and once in the client's usage; a call
the job sent live counts at list price; a reply stored before the job counts as a
cache hit. This module must not hold the batches' lifecycle (``collector``), the
providers' protocols (``wire``) or the job's scheduling (``rlm.jobs.batch``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm.batchapi.collector import Collector, Entry, LineRetry
from rlm.batchapi.journal import Journal
from rlm.batchapi.settings import BatchSettings
from rlm.batchapi.wire import wire_for
from rlm.cache import Cache, ReplyLike, SQLiteCache, request_key
from rlm.errors import ConfigError, LLMError
from rlm.providers import Adapter, Reply, Request
from rlm.usage import BudgetLedger

if TYPE_CHECKING:
    from rlm.llm import AsyncOpenAIClient

__all__ = ["Answer", "Attempt", "BatchPending", "BatchService", "ClientRoute"]

log = logging.getLogger("rlm.batchapi")

# A new call still waiting for room in the job's budget after this long flushes the
# open files (their calls hold the room).
_ROOM_WAIT_S = 0.05
# The job's own reply store never evicts: a reply the job paid for must be there when
# its task is replayed.
_JOB_STORE_BYTES = 1 << 42


def _endpoint(adapter: Adapter) -> str:
    """Who a batch belongs to, as the journal names it: provider, URL and a digest of the
    key (never the key)."""
    digest = hashlib.sha256(adapter.api_key.encode()).hexdigest()[:12]
    return f"{adapter.name} {adapter.base_url} {digest}"


class BatchPending(LLMError):
    """This call went to a provider batch: the run stops and is replayed once it is
    answered (batch mode's signal, never a failure of the task)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A routed call's reply and how it was paid: ``paid`` "batch" (at the batch price),
    "live" (list price) or None (a stored reply: nothing paid); ``first``: the first time
    this process hands it out, so the client's own usage counts it once."""

    reply: ReplyLike
    paid: str | None
    first: bool


class Attempt:
    """One try of one task: whether it parked, on what, and how far it got.

    Runs started inside ``spending_from(attempt.ledger)`` belong to it: the ledger is
    its badge (it holds no caps). ``live`` tries are not routed at all (a task whose
    replays stopped getting further). ``wait()`` returns once every call it parked on
    is answered (or failed, or is to be asked again).
    """

    def __init__(self, task: str, *, live: bool = False) -> None:
        self.task = task
        self.live = live
        self.ledger = BudgetLedger(name=f"task {task}")
        self.parked = False
        self.sealed = False
        self.used: set[str] = set()
        self.waits: list[Entry] = []
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._left = 0
        self._lock = threading.Lock()

    def park(self, entry: Entry) -> None:
        """Wait on ``entry`` (engine loop)."""
        self.parked = True
        self.waits.append(entry)
        with self._lock:
            self._left += 1
        entry.future.add_done_callback(self._one_done)

    def _one_done(self, _: Any) -> None:
        with self._lock:
            self._left -= 1
            left = self._left
        if left == 0:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def wait(self) -> None:
        """Until every call this try parked on has an outcome."""
        with self._lock:
            if self._left == 0:
                return
        await self._ready.wait()


class ClientRoute:
    """The Batch API hook of one client: answers the calls of batch-mode tries.

    ``claims(ledger)`` says whether a call belongs to a try of this job; ``answer``
    serves it (a reply with how it was paid, ``BatchPending``, the call's final error,
    or None to send it live as usual); ``handed_back`` is told what the run's code got,
    so a try that saw a pending call submits nothing more.
    """

    def __init__(self, service: BatchService, client: AsyncOpenAIClient,
                 collector: Collector) -> None:
        self.service = service
        self.client = client
        self.collector = collector

    def claims(self, ledger: BudgetLedger) -> bool:
        """True when ``ledger`` is (or draws from) the badge of a try of this job."""
        return self.service.attempt_of(ledger) is not None

    async def answer(self, request: Request, ledger: BudgetLedger) -> Answer | None:
        """The answer to one routed call, or ``BatchPending`` once it is in a batch.

        A live try (a task finished on the live API) gets what the job already has and
        waits for what is in a batch; anything new it sends live (None).
        """
        service = self.service
        attempt = service.attempt_of(ledger)
        if attempt is None or not request.cache:
            return None  # not this job's, or a fresh sample was asked for: live as usual
        key = request_key(self.client.base_url, request.body)
        if key is None:
            return None
        collector = self.collector
        entry = collector.get(key)
        if entry is None:
            stored = await service.lookup(key)
            if stored is not None:
                paid = service.paid.get(key)
                if paid is not None:
                    attempt.used.add(key)
                return Answer(stored, paid, paid is not None and service.deliver(key))
            entry = collector.get(key)
            if entry is None:
                if attempt.live:
                    return None
                if attempt.sealed:
                    raise BatchPending("not submitted: this try already waits on the Batch API")
                hold = await service.reserve(request)
                entry = collector.add(key, request, attempt.task)
                service.watch(entry, hold)
        future = entry.future
        if attempt.live and not future.done():
            await asyncio.wait([future])
        if future.done() and not future.cancelled():
            error = future.exception()
            if error is None:
                reply, paid = future.result()
                attempt.used.add(key)
                return Answer(reply, paid, service.deliver(key))
            if not isinstance(error, LineRetry):
                raise error
        if attempt.live:
            return None
        attempt.park(entry)
        raise BatchPending("waiting on the provider's Batch API; the task is replayed once "
                           "this call is answered")

    def handed_back(self, ledger: BudgetLedger, results: Sequence[Any]) -> None:
        """What a call (or a batch of calls) of a routed run returned to its code."""
        if any(isinstance(r, BatchPending) for r in results):
            attempt = self.service.attempt_of(ledger)
            if attempt is not None:
                attempt.sealed = True


class _Recorder:
    """A collector's reports, for one endpoint: into the journal and the reply stores."""

    def __init__(self, service: BatchService, endpoint: str) -> None:
        self.service = service
        self.endpoint = endpoint
        self.collector: Collector  # set once the collector exists

    async def submitting(self, token: str, model: str, keys: list[str],
                         tasks: list[str | None], params: list[dict[str, Any] | None]) -> None:
        await asyncio.to_thread(self.service.journal.submitting, token, self.endpoint, model,
                                keys, tasks, params)

    async def submitted(self, token: str, batch_id: str) -> None:
        await asyncio.to_thread(self.service.journal.submitted, token, batch_id)

    async def collected(self, batch_id: str, replies: Mapping[str, Reply]) -> None:
        service = self.service
        try:
            await asyncio.to_thread(service.store_replies, replies)
        except Exception as exc:  # noqa: BLE001 - kept in memory; collected again on a re-run
            log.warning("rlm batch: storing the replies of batch %s failed: %s", batch_id, exc)
            return
        await asyncio.to_thread(service.journal.collected, batch_id)
        self.collector.forget(list(replies))

    async def sent_live(self, replies: Mapping[str, Reply]) -> None:
        service = self.service
        await asyncio.to_thread(service.store_replies, replies)
        await asyncio.to_thread(service.journal.sent_live, list(replies))


class BatchService:
    """A job's Batch API machinery (engine loop): one collector and route per client, the
    journal, the reply stores, the tries and their badges.

    ``start`` reads the journal back (collecting what an earlier process submitted),
    then installs the routes; ``close`` removes them. ``store`` is the RLM's reply cache
    (read for earlier replies and written with new ones when it allows); the job's own
    store under ``state_dir`` always keeps what the job paid for.
    """

    def __init__(self, settings: BatchSettings, state_dir: str | os.PathLike[str],
                 clients: Sequence[AsyncOpenAIClient], *, job_ledger: BudgetLedger | None = None,
                 ) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.journal = Journal(self.state_dir)
        self.clients = list(dict.fromkeys(clients))  # one route per client object
        self.job_ledger = job_ledger
        self.routes: list[ClientRoute] = []
        self.paid: dict[str, str] = {}
        self._delivered: set[str] = set()
        self._attempts: dict[int, Attempt] = {}
        self._holds: dict[int, Any] = {}
        self._lookups: dict[str, asyncio.Future[ReplyLike | None]] = {}
        self._job_store: Cache | None = None
        self._user_stores: list[tuple[Cache, bool, bool]] = []
        self.resumed = 0

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the stores and the journal, take over open batches, install the routes."""
        if any(client.batch_route is not None for client in self.clients):
            raise ConfigError("another batch-mode job is running on this RLM's clients; run "
                              "one batch-mode job at a time per RLM")
        state = await asyncio.to_thread(self.journal.load)
        self._job_store = await asyncio.to_thread(
            SQLiteCache, self.state_dir / "cache", max_bytes=_JOB_STORE_BYTES)
        self.paid = state.paid()
        # One collector per endpoint and key: a root and a sub client on the same
        # endpoint share it, so a call is found pending whichever client asks.
        by_endpoint: dict[str, Collector] = {}
        for client in self.clients:
            adapter = client.provider_adapter()
            endpoint = _endpoint(adapter)
            collector = by_endpoint.get(endpoint)
            if collector is None:
                recorder = _Recorder(self, endpoint)
                collector = by_endpoint[endpoint] = recorder.collector = Collector(
                    client, wire_for(adapter), self.settings, recorder)
            self.routes.append(ClientRoute(self, client, collector))
            cache = client.reply_cache
            if cache is not None and cache.store is not None and all(
                    cache.store is not s for s, _, _ in self._user_stores):
                self._user_stores.append((cache.store, cache.read, cache.write))
        for sub in state.unconfirmed():
            collector = by_endpoint.get(sub.endpoint)
            if collector is not None:
                found = await collector.wire.find(sub.token)
                if found is not None:
                    sub.batch = found
                    await asyncio.to_thread(self.journal.submitted, sub.token, found)
                    for key in sub.keys:
                        self.paid.setdefault(key, "batch")
        for sub in state.open_batches():
            collector = by_endpoint.get(sub.endpoint)
            if collector is not None:
                collector.adopt(sub.batch or "", sub.model, sub.keys, sub.at, sub.tasks,
                                sub.params)
                self.resumed += 1
        for route in self.routes:
            route.client.route_batches(route)

    @property
    def collectors(self) -> list[Collector]:
        """One per endpoint the job's clients talk to."""
        return list({id(r.collector): r.collector for r in self.routes}.values())

    async def cancel(self) -> None:
        """Cancel every open batch; what they finished is kept (Ctrl-C, SIGTERM)."""
        await asyncio.gather(*(c.cancel(self.settings.cancel_wait_s) for c in self.collectors))

    async def close(self) -> None:
        """Remove the routes, stop polling, close the journal and the job's store."""
        for route in self.routes:
            if route.client.batch_route is route:
                route.client.route_batches(None)
        for collector in self.collectors:
            await collector.aclose()
        self.journal.close()
        if self._job_store is not None:
            await asyncio.to_thread(self._job_store.close)

    # -- tries --------------------------------------------------------------------------

    def attempt(self, task: str, *, live: bool = False) -> Attempt:
        """A new try of ``task`` (call on the loop that will wait on it)."""
        attempt = Attempt(task, live=live)
        self._attempts[id(attempt.ledger)] = attempt
        return attempt

    def release(self, attempt: Attempt) -> None:
        """The try ended: its calls are no longer routed."""
        self._attempts.pop(id(attempt.ledger), None)

    def attempt_of(self, ledger: BudgetLedger | None) -> Attempt | None:
        """The try whose badge ``ledger`` is or draws from, if any."""
        while ledger is not None:
            attempt = self._attempts.get(id(ledger))
            if attempt is not None:
                return attempt
            ledger = ledger.parent
        return None

    def flush(self) -> None:
        """Every task waits: submit every open file now."""
        for collector in self.collectors:
            collector.flush()

    # -- replies and money --------------------------------------------------------------

    def deliver(self, key: str) -> bool:
        """True the first time this process hands out ``key``'s paid reply."""
        if key in self._delivered:
            return False
        self._delivered.add(key)
        return True

    async def lookup(self, key: str) -> ReplyLike | None:
        """``key``'s reply in the job's store or the RLM's cache (lookups made in the same
        moment share one trip to the disk)."""
        loop = asyncio.get_running_loop()
        future = self._lookups.get(key)
        if future is None:
            if not self._lookups:
                loop.call_soon(self._run_lookups)
            future = self._lookups[key] = loop.create_future()
        return await asyncio.shield(future)

    def _run_lookups(self) -> None:
        asked, self._lookups = self._lookups, {}
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._get_many, list(asked)))

        def done(t: asyncio.Task[dict[str, ReplyLike]]) -> None:
            error = None if t.cancelled() else t.exception()
            found = {} if t.cancelled() or error is not None else t.result()
            for key, future in asked.items():
                if not future.done():
                    future.set_result(found.get(key))

        task.add_done_callback(done)

    def _get_many(self, keys: list[str]) -> dict[str, ReplyLike]:
        found: dict[str, ReplyLike] = {}
        if self._job_store is not None:
            found.update(self._job_store.get_many(keys))
        for store, read, _ in self._user_stores:
            rest = [k for k in keys if k not in found]
            if read and rest:
                try:
                    found.update(store.get_many(rest))
                except Exception:  # noqa: BLE001, S112 - a failing cache is a miss
                    continue
        return found

    def store_replies(self, replies: Mapping[str, Reply]) -> None:
        """Keep ``replies`` in the job's store and, where it allows, the RLM's cache
        (runs on a thread)."""
        if not replies:
            return
        if self._job_store is not None:
            self._job_store.put_many(replies)
        for store, _, write in self._user_stores:
            if write:
                try:
                    store.put_many(replies)
                except Exception:  # noqa: BLE001, S112 - the job's store has them
                    continue

    async def reserve(self, request: Request) -> Any:
        """Hold the job's budget for one new call (None: the job has no cap).

        A call that has to wait for room submits the open files at once: the room comes
        back only when the calls holding it are answered.
        """
        ledger = self.job_ledger
        if ledger is None:
            return None
        hold = asyncio.ensure_future(
            ledger.reserve(request.model, request.prompt_chars(), request.max_tokens))
        done, _ = await asyncio.wait([hold], timeout=_ROOM_WAIT_S)
        if not done:
            self.flush()
        return await hold

    def watch(self, entry: Entry, hold: Any) -> None:
        """Settle the job's budget and note what was paid once ``entry`` has an outcome."""

        def done(future: asyncio.Future[tuple[Reply, str]]) -> None:
            ledger = self.job_ledger
            if future.cancelled() or future.exception() is not None:
                if ledger is not None:
                    ledger.cancel(hold)
                return
            reply, paid = future.result()
            self.paid[entry.key] = paid
            if ledger is not None:
                ledger.settle_reply(hold, reply, batch=paid == "batch")

        entry.future.add_done_callback(done)

    # -- progress -----------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Batches and lines so far, over every client, and what is open now."""
        total: dict[str, Any] = {}
        collectors = self.collectors
        for collector in collectors:
            for name, value in collector.counts().items():
                total[name] = total.get(name, 0) + value
        ages = [a for c in collectors if (a := c.oldest_open_s()) is not None]
        turns = [t for c in collectors if (t := c.typical_turnaround_s()) is not None]
        total["oldest_open_s"] = max(ages) if ages else None
        total["turnaround_s"] = max(turns) if turns else None
        total["resumed"] = self.resumed
        return total
