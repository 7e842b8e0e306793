"""The client's in-flight limiter: never strands a waiter, adapts to what the server accepts.

One ``AdaptiveLimiter`` per client lives on the engine loop. It hands out slots (at
most ``limit`` requests in flight), queues callers fairly when none is free, and
moves ``limit`` with the replies:

- **Liveness.** Every event that can free a slot (a release, a cancelled holder, a
  higher limit, the end of a pause) runs ``_wake``, which grants slots to queued
  waiters until none is free. A waiter is granted by resolving its future *with the
  slot already counted*; a granted waiter that is cancelled before it runs gives the
  slot back through ``abandon``, which wakes the next one. No path returns a slot
  without waking, so no schedule of replies, pauses and cancellations can leave a
  waiter asleep while a slot is free (tests/test_limiter.py checks thousands).
- **Adaptation to the acceptance rate.** Replies are counted in windows of about
  one limit's worth, and only replies to requests sent under the current limit
  count. A window whose rejection rate (429 and 503) is above the learned base
  rate cuts the limit to the accepted share. If the next window shows the same rate,
  the rejections do not depend on load (random faults): that rate becomes the base and
  the old limit comes back, so random faults at rate p cost about 1/(1-p), not a
  collapse. Below the base, the limit grows by 1/16 per window, which is how it
  settles just under a token bucket's rate with few 429s.
- **Pauses only when the server says so.** A run of consecutive rejections that
  carry Retry-After (the server is refusing everyone) pauses new sends for that long
  and no longer. An isolated 429 only delays its own retry (the client sleeps it).

The core is synchronous and loop-agnostic (a clock and a ``call_later`` are injected),
so the randomised test drives the very same code with a fake clock, no sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

# Reply outcomes passed to ``release``.
OK, REJECTED, OTHER = 0, 1, 2

# Consecutive rejections with Retry-After that mean "everyone is refused right now".
STORM_STREAK = 8
# Replies per adaptation window, at least (small limits would otherwise judge on noise).
MIN_WINDOW = 32


class Waiter(Protocol):
    """What a queued caller is: the subset of ``asyncio.Future`` the limiter uses."""

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...


class AdaptiveLimiter:
    """At most ``limit`` requests in flight, ``limit`` adapting between 1 and ``max_limit``.

    ``acquire()`` waits for a slot and returns the epoch to pass back to
    ``release(epoch, outcome, retry_after)`` when the request is over (``outcome``
    is ``OK``, ``REJECTED`` for a 429/503, or ``OTHER``). ``clock`` and
    ``call_later(delay, fn)`` default to the running loop's, resolved lazily.
    """

    def __init__(
        self,
        max_limit: int,
        *,
        clock: Callable[[], float] | None = None,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        self.max_limit = max_limit
        self.limit = max_limit
        self.in_flight = 0
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._clock = clock or time.monotonic
        self._call_later = call_later
        self._paused_until = 0.0
        self._timer_at = 0.0
        # Adaptation state: the current epoch (bumped at each limit change) and its counts.
        self.epoch = 0
        self._seen = 0
        self._rejected = 0
        self.base_rejection = 0.0
        self._cut_from: int | None = None
        self._cut_rate = 0.0
        self._streak = 0

    # -- slots ---------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while a server-wide pause (from Retry-After) holds new sends back."""
        return self._paused_until > self._clock()

    @property
    def waiting(self) -> int:
        """Queued callers (cancelled ones not yet skipped included)."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody queues ahead; True when taken."""
        if self.in_flight < self.limit and not self._waiters and not self._paused_until:
            self.in_flight += 1
            return True
        if self._paused_until and not self.paused:
            self._paused_until = 0.0
            if self.in_flight < self.limit and not self._waiters:
                self.in_flight += 1
                return True
        return False

    def enqueue(self, waiter: Waiter) -> None:
        """Queue ``waiter``; it is resolved (holding a slot) when one is granted to it."""
        self._waiters.append(waiter)
        self._wake()

    def abandon(self, waiter: Waiter) -> None:
        """A queued caller gives up (cancelled): free its slot if it had been granted one."""
        if waiter.done() and not waiter.cancelled():
            self.in_flight -= 1
            self._wake()
        # An ungranted waiter stays in the queue as done-and-skipped: O(1), not O(n).

    async def acquire(self) -> int:
        """Wait for a slot (fairly, in arrival order); returns the epoch for ``release``."""
        if self.try_acquire():
            return self.epoch
        if self._call_later is None:
            self._call_later = asyncio.get_running_loop().call_later
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.enqueue(fut)
        try:
            await fut
        except BaseException:
            self.abandon(fut)
            raise
        return self.epoch

    def release(self, epoch: int, outcome: int = OTHER, retry_after: float | None = None) -> None:
        """Give a slot back and learn from how its request went."""
        self.in_flight -= 1
        if outcome != OTHER:
            self._observe(epoch, outcome == REJECTED, retry_after)
        self._wake()

    def _wake(self) -> None:
        if self._paused_until:
            now = self._clock()
            if self._paused_until > now:
                self._arm_timer(self._paused_until, now)
                return
            self._paused_until = 0.0
        waiters = self._waiters
        while waiters and self.in_flight < self.limit:
            fut = waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    def _arm_timer(self, at: float, now: float) -> None:
        # One timer at a time: a pause that grows re-arms from the old timer's callback.
        if self._timer_at and self._timer_at <= at:
            return  # that timer's wake-up re-arms for the rest of the pause
        self._timer_at = at
        call_later = self._call_later
        if call_later is None:
            call_later = self._call_later = asyncio.get_running_loop().call_later
        call_later(max(0.0, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer_at = 0.0
        self._wake()

    # -- adaptation ----------------------------------------------------------------

    def _observe(self, epoch: int, rejected: bool, retry_after: float | None) -> None:
        if rejected:
            self._streak += 1
            if retry_after and self._streak >= min(STORM_STREAK, max(2, self.limit)):
                until = self._clock() + retry_after
                if until > self._paused_until:
                    self._paused_until = until
        else:
            self._streak = 0
        if epoch != self.epoch:
            return  # sent under an older limit: says nothing about this one
        self._seen += 1
        self._rejected += rejected
        if self._seen >= max(MIN_WINDOW, self.limit):
            self._judge_window()

    def _judge_window(self) -> None:
        n, rate = self._seen, self._rejected / self._seen
        base = self.base_rejection
        # A window's rate is noisy: three standard deviations around the base, plus 2
        # points, before a window counts as "more rejections than the base explains".
        sigma = math.sqrt(max(base, 0.003) * (1 - min(base, 0.99)) / n)
        slack = 3 * sigma + 0.02
        limit = self.limit
        if rate > base + slack:
            if self._cut_from is not None and rate >= self._cut_rate - slack:
                # Cutting did not lower the rejection rate: it does not depend on load.
                # Both windows measured it; their mean is the new base.
                self.base_rejection = (rate + self._cut_rate) / 2
                limit = max(limit, self._cut_from)
                self._cut_from = None
            else:
                if self._cut_from is None:
                    self._cut_from = limit
                self._cut_rate = rate
                # To the accepted share: a 10x overshoot is fixed in one step, and the
                # next window's rate then clearly says whether the cut helped.
                limit = max(1, int(limit * max(1 / 16, 1.0 - (rate - base))))
        else:
            self._cut_from = None
            # The base only rises through the test above (a cut that did not help);
            # it eases down when windows are clearly below it, so a fault rate that has
            # passed is forgotten, while a rate that climbs with load is never learned.
            if rate < base - sigma:
                self.base_rejection = base + 0.1 * (rate - base)
            if limit < self.max_limit:
                limit = min(self.max_limit, limit + max(1, limit // 16))
        self._set_limit(limit)

    def _set_limit(self, limit: int) -> None:
        self.epoch += 1
        self._seen = self._rejected = 0
        grew = limit > self.limit
        self.limit = limit
        if grew:
            self._wake()
