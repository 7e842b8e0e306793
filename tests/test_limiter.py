"""The adaptive limiter alone, driven by a discrete-event simulation on a fake clock.

Thousands of random schedules of arrivals, 429s and 503s (with and without
Retry-After), pauses and cancellations (of queued callers and of callers granted a
slot but not yet running) run against the very ``AdaptiveLimiter`` the client uses.
After every event the simulation checks that no slot leaked and that no caller waits
while a slot is free and no pause holds; at the end every request has finished.
Nothing sleeps: time is a number the simulation advances.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from rlm.limiter import OK, OTHER, REJECTED, AdaptiveLimiter


class FakeFuture:
    """The part of asyncio.Future the limiter uses, resolved synchronously."""

    def __init__(self, on_result: Callable[[], None]) -> None:
        self._state = "pending"
        self._on_result = on_result

    def done(self) -> bool:
        return self._state != "pending"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def set_result(self, result: Any, /) -> None:
        assert self._state == "pending", "a waiter was granted twice"
        self._state = "done"
        self._on_result()

    def cancel(self) -> None:
        if self._state == "pending":
            self._state = "cancelled"


@dataclass
class Sim:
    """A tiny event loop with a fake clock: (time, seq, callback) in a heap."""

    now: float = 0.0
    events: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (self.now + max(0.0, delay), next(self.seq), fn))

    def timers_pending(self) -> bool:
        return bool(self.events)

    def step(self) -> bool:
        if not self.events:
            return False
        at, _, fn = heapq.heappop(self.events)
        self.now = max(self.now, at)
        fn()
        return True


class Schedule:
    """One random schedule: N requests through one limiter, each maybe retried or cancelled."""

    def __init__(self, seed: int) -> None:
        rng = self.rng = random.Random(seed)
        self.sim = Sim()
        self.max_limit = rng.choice([1, 2, 3, 5, 8, 16, 64])
        self.limiter = AdaptiveLimiter(
            self.max_limit, clock=self.sim.clock, call_later=self.sim.call_later
        )
        self.n = rng.randint(1, 120)
        self.p_reject = rng.choice([0.0, 0.05, 0.2, 0.5, 0.9])
        self.p_retry_after = rng.choice([0.0, 0.5, 1.0])
        self.p_cancel_waiting = rng.choice([0.0, 0.05, 0.3])
        self.p_cancel_granted = rng.choice([0.0, 0.05, 0.3])
        self.holders = 0          # slots the simulation's callers hold right now
        self.waiting: set[int] = set()
        self.finished = 0
        self.futures: dict[int, FakeFuture] = {}
        self.attempts = [0] * self.n

    def run(self) -> None:
        for i in range(self.n):
            self.sim.call_later(self.rng.uniform(0, 2.0), lambda i=i: self.arrive(i))
        steps = 0
        while self.sim.step():
            steps += 1
            self.check()
            assert steps < 1_000_000, "the schedule never ended"
        assert self.finished == self.n, f"{self.n - self.finished} requests never finished"
        assert self.limiter.in_flight == 0
        assert self.holders == 0
        assert not self.waiting

    def arrive(self, i: int) -> None:
        self.attempts[i] += 1
        if self.limiter.try_acquire():
            self.holders += 1
            self.sim.call_later(0.0, lambda: self.start(i))
            return
        fut = FakeFuture(lambda: self.granted(i))
        self.futures[i] = fut
        self.waiting.add(i)
        self.limiter.enqueue(fut)
        if self.rng.random() < self.p_cancel_waiting:
            self.sim.call_later(self.rng.uniform(0, 1.0), lambda: self.cancel_waiting(i, fut))

    def granted(self, i: int) -> None:
        # The limiter counted the slot when it resolved the future; the task runs later.
        self.waiting.discard(i)
        self.holders += 1
        if self.rng.random() < self.p_cancel_granted:
            # Cancelled between the grant and its first step (asyncio allows exactly this).
            fut = self.futures[i]
            self.sim.call_later(0.0, lambda: self.cancel_granted(i, fut))
        else:
            self.sim.call_later(0.0, lambda: self.start(i))

    def cancel_waiting(self, i: int, fut: FakeFuture) -> None:
        if fut.done():
            return  # granted meanwhile: it runs
        fut.cancel()
        self.waiting.discard(i)
        self.limiter.abandon(fut)
        self.finished += 1

    def cancel_granted(self, i: int, fut: FakeFuture) -> None:
        self.holders -= 1
        self.limiter.abandon(fut)
        self.finished += 1

    def start(self, i: int) -> None:
        epoch = self.limiter.epoch
        self.sim.call_later(self.rng.uniform(0.001, 0.5), lambda: self.reply(i, epoch))

    def reply(self, i: int, epoch: int) -> None:
        self.holders -= 1
        rng = self.rng
        if rng.random() < self.p_reject and self.attempts[i] < 12:
            retry_after = rng.choice([0.01, 0.3, 1.0]) if rng.random() < self.p_retry_after else None
            self.limiter.release(epoch, REJECTED, retry_after)
            self.sim.call_later(retry_after or rng.uniform(0.05, 0.5), lambda: self.arrive(i))
            return
        self.limiter.release(epoch, rng.choice([OK, OK, OK, OTHER]))
        self.finished += 1

    def check(self) -> None:
        lim = self.limiter
        assert lim.in_flight == self.holders, "a slot leaked or was counted twice"
        assert 1 <= lim.limit <= self.max_limit
        assert lim.in_flight <= self.max_limit
        if self.waiting:
            if lim.paused:
                assert self.sim.timers_pending(), "paused with waiters and no wake-up timer"
            else:
                assert lim.in_flight >= lim.limit, (
                    f"{len(self.waiting)} waiters asleep with {lim.in_flight} of "
                    f"{lim.limit} slots in use and no pause"
                )


@pytest.mark.parametrize("block", range(8))
def test_no_schedule_leaves_a_waiter_asleep_while_a_slot_is_free(block: int) -> None:
    # 8 x 500 = 4,000 schedules, each with its own seed: a failure names its seed.
    for seed in range(block * 500, (block + 1) * 500):
        try:
            Schedule(seed).run()
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from None


def _steady_load(limiter: AdaptiveLimiter, sim: Sim, rounds: int,
                 outcome: Callable[[float], bool]) -> tuple[int, int]:
    """Keep the limiter full for ``rounds`` round trips of 0.1 s; return (sent, rejected)."""
    sent = rejected = 0
    for _ in range(rounds):
        epochs = []
        while limiter.try_acquire():
            epochs.append(limiter.epoch)
        sim.now += 0.1
        for epoch in epochs:
            sent += 1
            bad = outcome(sim.now)
            rejected += bad
            limiter.release(epoch, REJECTED if bad else OK)
    return sent, rejected


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_random_faults_do_not_collapse_the_limit(p: float) -> None:
    sim = Sim()
    limiter = AdaptiveLimiter(64, clock=sim.clock, call_later=sim.call_later)
    rng = random.Random(7)
    sent, rejected = _steady_load(limiter, sim, 200, lambda _now: rng.random() < p)
    # Throughput per round trip against the unlimited 64: the cost is about 1/(1-p).
    assert (sent - rejected) / 200 >= 0.8 * 64 * (1 - p)
    assert limiter.limit >= 48


def test_a_token_bucket_is_found_with_few_rejections() -> None:
    sim = Sim()
    limiter = AdaptiveLimiter(256, clock=sim.clock, call_later=sim.call_later)
    rate, tokens, last = 200.0, 20.0, 0.0   # 200 requests/s; 0.1 s round trips: ~20 in flight

    def bucket(now: float) -> bool:
        nonlocal tokens, last
        tokens = min(20.0, tokens + (now - last) * rate)
        last = now
        if tokens >= 1:
            tokens -= 1
            return False
        return True

    _steady_load(limiter, sim, 30, bucket)   # the first burst finds the rate
    sent, rejected = _steady_load(limiter, sim, 300, bucket)
    assert rejected <= 0.1 * sent
    assert sent - rejected >= 0.8 * rate * 300 * 0.1
