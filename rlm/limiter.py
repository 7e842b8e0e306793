"""One lane's gate: slots, a fair queue, pacing, pauses, and learning from rejections.

An ``AdaptiveLimiter`` guards one (endpoint, model) lane on the engine loop. A request
goes when a slot is free (at most ``limit`` in flight), its lane's ``Pacer`` lets it
(request and token budgets, a learned rate; see ``rlm.pacing``) and no server-wide
pause holds; callers queue fairly, in arrival order, otherwise.

- **Liveness.** Every event that can free capacity (a release, a cancelled holder, a
  pause or a pacing delay running out, a header that raised a budget) runs ``_wake``,
  which grants the queue's head while capacity is free and otherwise arms one timer
  for the moment the pacer or pause will let it go. A waiter is granted by resolving
  its future with its ``Ticket``, the slot already counted; a granted waiter cancelled
  before it runs gives the slot back through ``abandon``. So no schedule of replies,
  pauses, header updates and cancellations leaves a waiter asleep while it could go
  (tests/test_limiter.py checks thousands).
- **A new lane starts careful.** Until its first replies are in, at most
  ``COLD_LIMIT`` requests go out, so a fresh client meeting a limit it knows nothing
  of draws a bounded number of 429s; headers, or the judgement of those replies,
  open it up.
- **Learning from rejections (429, 503) by rate, not by concurrency.** Replies are
  counted per *epoch* (one pacing setting); only replies to requests sent under the
  current epoch count. When an epoch's rejections clearly exceed the learned base
  rate, the lane is paced just under the rate the server accepted (accepted share x
  send rate), whatever ``max_concurrency`` is. A bucket's rejections then fall; if
  instead the rejection rate holds through ``CONFIRM`` cuts in a row, each to what
  was accepted, it does not depend on load (random faults): that rate becomes the base
  and the pace before the cuts comes back. A bucket cannot hold its rejection rate
  when sent less than it accepted, however much burst it had, so it is never mistaken
  for random faults. Clean epochs speed a binding pace up by 1/16.
- **Pauses only when the server says so.** A run of consecutive rejections that
  carry Retry-After pauses new sends for that long and no longer.

The core is synchronous and loop-agnostic (a clock and a ``call_later`` are
injected), so the property tests drive the very same code with a fake clock.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from rlm.pacing import Pacer
from rlm.providers.ratelimits import RateLimits

# Reply outcomes passed to ``release``.
OK, REJECTED, OTHER = 0, 1, 2

# Consecutive rejections with Retry-After that mean "everyone is refused right now".
STORM_STREAK = 8
# Replies an epoch needs before it is judged (fewer would judge on noise).
MIN_WINDOW = 32
# Replies an epoch needs while cuts are being checked for whether they helped: the
# verdict "this rejection rate does not depend on load" must not rest on noise.
RUN_WINDOW = 128
# A clean verdict waits for this share of the epoch's sends: replies that come back
# first are not a fair sample (a bucket answers its earliest arrivals).
CLEAN_SHARE = 0.75
# In flight on a lane before its first replies were judged.
COLD_LIMIT = 512
# Pace this far below the rate a cut measured the server to accept.
CUT_MARGIN = 0.95
# One epoch's cut goes at most this far (an epoch judged early, on its first replies,
# at most half as far): the accepted share of a few replies is noisy.
MAX_CUT = 1 / 4
EARLY_CUT = 1 / 2
# Complete epochs in a row whose rejection rate did not fall, each cut to what the one
# before accepted, before that rate counts as load-independent.
CONFIRM = 2
# A paced lane that keeps up speeds up by this share per clean epoch, doubling with
# each clean epoch in a row up to MAX_GROWTH.
GROWTH = 1 / 16
MAX_GROWTH = 1 / 4


class Waiter(Protocol):
    """What a queued caller is: the subset of ``asyncio.Future`` the limiter uses."""

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def result(self) -> Any: ...


class Ticket:
    """One granted send: what ``release`` needs to learn from its reply."""

    __slots__ = ("cost", "epoch", "sent_at", "seq", "tokens_seq")

    def __init__(self, epoch: int, sent_at: float, seq: int, tokens_seq: float,
                 cost: float) -> None:
        self.epoch = epoch
        self.sent_at = sent_at
        self.seq = seq
        self.tokens_seq = tokens_seq
        self.cost = cost


def _no_cost(item: Any) -> float:
    return 0.0


class AdaptiveLimiter:
    """At most ``limit`` requests in flight, paced by ``pacer``, learning from rejections.

    ``acquire(item)`` waits for capacity and returns the ``Ticket`` to pass back to
    ``release(ticket, outcome, retry_after, limits)`` when the request is over
    (``outcome`` is ``OK``, ``REJECTED`` for a 429/503, or ``OTHER``; ``limits`` what
    the reply's rate-limit headers said). ``cost_of(item)`` is the request's token
    estimate, asked only while a token budget is known. ``clock`` and
    ``call_later(delay, fn)`` default to the running loop's, resolved lazily.
    """

    def __init__(
        self,
        max_limit: int,
        *,
        pacer: Pacer | None = None,
        cost_of: Callable[[Any], float] = _no_cost,
        clock: Callable[[], float] | None = None,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        self.max_limit = max_limit
        self.limit = max_limit
        self.in_flight = 0
        self._clock = clock or time.monotonic
        self.pacer = pacer if pacer is not None else Pacer(now=self._clock())
        self._cost_of = cost_of
        # Queue entries: [waiter, item, cost or None until first asked].
        self._waiters: collections.deque[list[Any]] = collections.deque()
        self._call_later = call_later
        self._paused_until = 0.0
        self._timer_at = 0.0
        self.cold = True
        # Sends so far (requests and estimated tokens), to age a header's "remaining".
        self._seq = 0
        self._tokens_seq = 0.0
        self._tokens_out = 0.0
        # The current epoch and its counts.
        self.epoch = 0
        self._epoch_start = self._clock()
        self._sent = 0
        self._back = 0
        self._seen = 0
        self._rejected = 0
        self.base_rejection = 0.0
        self._base_n = 0  # replies the base was learned from (0: assumed, not measured)
        # An episode: epochs in a row with more rejections than the base explains. In
        # it, a run: complete epochs in a row whose rejection rate did not fall although
        # each was cut to what the one before accepted, and the pace before the run.
        self._episode = False
        self._episode_rate: float | None = None
        self._growth = GROWTH
        self._known = 0.0  # the capacity the last cut measured (requests/s)
        self._restore: float | None = None
        self._clamped = False
        self._run = 0
        self._run_rate = 0.0
        self._run_n = 1
        self._run_seen = 0
        self._run_rejected = 0
        self._streak = 0
        # What this lane has drawn and waited, for usage and the live view.
        self.rejections = 0
        self.cuts = 0

    # -- capacity ------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while a server-wide pause (from Retry-After) holds new sends back."""
        return self._paused_until > self._clock()

    @property
    def waiting(self) -> int:
        """Queued callers (cancelled ones not yet skipped included)."""
        return len(self._waiters)

    @property
    def capacity(self) -> int:
        """Slots usable right now: ``limit``, or fewer while the lane is new."""
        return min(self.limit, COLD_LIMIT) if self.cold else self.limit

    @property
    def full(self) -> bool:
        """True when no slot is free (or a new lane's first sends are all out)."""
        if not self.cold:
            return self.in_flight >= self.limit
        cap = min(self.limit, COLD_LIMIT)
        # The first epoch of a new lane sends at most that many before it is judged.
        return self.in_flight >= cap or (self.epoch == 0 and self._sent >= cap)

    def pacing_delay(self, item: Any = None) -> float:
        """Seconds the pacer and any pause would hold a send of ``item`` back now."""
        now = self._clock()
        pause = self._paused_until - now if self._paused_until else 0.0
        pacer = self.pacer
        cost = self._cost_of(item) if pacer.counts_tokens and item is not None else 0.0
        return max(pause, pacer.delay(cost, now) if pacer.active else 0.0, 0.0)

    def _grant(self, cost: float, now: float) -> Ticket:
        self.in_flight += 1
        self._seq += 1
        self._tokens_seq += cost
        self._tokens_out += cost
        self._sent += 1
        return Ticket(self.epoch, now, self._seq, self._tokens_seq, cost)

    def try_acquire(self, item: Any = None) -> Ticket | None:
        """Take capacity now if it is free and nobody queues ahead; the ticket, or None."""
        if self._waiters or self.full:
            return None
        now = self._clock()
        if self._paused_until:
            if self._paused_until > now:
                return None
            self._paused_until = 0.0
        pacer = self.pacer
        cost = 0.0
        if pacer.active:
            if pacer.counts_tokens:
                cost = self._cost_of(item)
            if pacer.delay(cost, now) > 0:
                return None
            pacer.take(cost, now)
        return self._grant(cost, now)

    def enqueue(self, waiter: Waiter, item: Any = None) -> None:
        """Queue ``waiter``; it is resolved with a ``Ticket`` when capacity is granted."""
        self._waiters.append([waiter, item, None])
        self._wake()

    def abandon(self, waiter: Waiter) -> None:
        """A queued caller gives up (cancelled): free its slot if it had been granted one."""
        if waiter.done() and not waiter.cancelled():
            self.in_flight -= 1
            self._tally(waiter.result(), OTHER, None, None)
            self._wake()
        # An ungranted waiter stays in the queue as done-and-skipped: O(1), not O(n).

    async def acquire(self, item: Any = None) -> Ticket:
        """Wait for capacity (fairly, in arrival order); the ticket for ``release``."""
        ticket = self.try_acquire(item)
        if ticket is not None:
            return ticket
        loop = asyncio.get_running_loop()
        if self._call_later is None:
            self._call_later = loop.call_later
        fut: asyncio.Future[Ticket] = loop.create_future()
        self.enqueue(fut, item)
        try:
            return await fut
        except BaseException:
            self.abandon(fut)
            raise

    def release(self, ticket: Ticket, outcome: int = OTHER, retry_after: float | None = None,
                limits: RateLimits | None = None) -> None:
        """Give a slot back and learn from how its request went."""
        self.in_flight -= 1
        self._tally(ticket, outcome, retry_after, limits)
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        if not waiters:
            return
        now = self._clock()
        if self._paused_until:
            if self._paused_until > now:
                self._arm_timer(self._paused_until, now)
                return
            self._paused_until = 0.0
        pacer = self.pacer
        while waiters and not self.full:
            entry = waiters[0]
            waiter = entry[0]
            if waiter.done():
                waiters.popleft()
                continue
            cost = 0.0
            if pacer.active:
                if pacer.counts_tokens:
                    cost = entry[2]
                    if cost is None:
                        cost = entry[2] = self._cost_of(entry[1])
                delay = pacer.delay(cost, now)
                if delay > 0:
                    self._arm_timer(now + delay, now)
                    return
                pacer.take(cost, now)
            waiters.popleft()
            waiter.set_result(self._grant(cost, now))

    def _arm_timer(self, at: float, now: float) -> None:
        # One timer at a time: a later one is re-armed from the earlier one's callback.
        if self._timer_at and self._timer_at <= at:
            return
        self._timer_at = at
        call_later = self._call_later
        if call_later is None:
            call_later = self._call_later = asyncio.get_running_loop().call_later
        call_later(max(0.0, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer_at = 0.0
        self._wake()

    # -- configuration -----------------------------------------------------------------

    def set_max_limit(self, max_limit: int) -> None:
        """Raise or lower the in-flight cap (a job sizing its clients to its tasks)."""
        self.max_limit = self.limit = max_limit
        self._wake()

    # -- adaptation ----------------------------------------------------------------

    def _tally(self, ticket: Ticket, outcome: int, retry_after: float | None,
               limits: RateLimits | None) -> None:
        """Learn from one finished request (``OTHER``: it failed otherwise or was
        dropped, which only counts it as back)."""
        now = self._clock()
        self._tokens_out -= ticket.cost
        if limits is not None:
            # What the server had not counted when it answered: requests sent after this
            # one and still out (those already back were counted, or refused).
            self.pacer.learn(limits, min(self._seq - ticket.seq, self.in_flight),
                             min(self._tokens_seq - ticket.tokens_seq, self._tokens_out), now,
                             now - ticket.sent_at)
            self.cold = False  # the server said where its limits stand
        rejected = outcome == REJECTED
        if rejected:
            self.pacer.refund(ticket.cost, now)
            self.rejections += 1
            self._streak += 1
            if retry_after and self._streak >= min(STORM_STREAK, max(2, self.capacity)):
                until = now + retry_after
                if until > self._paused_until:
                    self._paused_until = until
        elif outcome == OK:
            self._streak = 0
        if ticket.epoch != self.epoch:
            return  # sent under an older pace: says nothing about this one
        self._back += 1
        if outcome != OTHER:
            self._seen += 1
            self._rejected += rejected
        seen, sent = self._seen, self._sent
        if seen < MIN_WINDOW:
            if self.cold and self._back >= sent:
                # A handful of requests, all back: too few to judge, nothing to fear.
                self.cold = False
            return
        if (self._back >= sent) if (self.cold and self.epoch == 0) else (
            seen >= CLEAN_SHARE * sent or not (self._rejected or self._episode)
        ):
            if seen >= (RUN_WINDOW if self._episode else MIN_WINDOW):
                self._judge(now, complete=True)
            return
        # Judged early when, even if every request still out succeeds, this epoch
        # rejected too many: more than the base explains, or in an episode, clearly more
        # than the last epoch judged (a stricter bound: this test runs at every reply).
        floor = self._run_rate if self._episode else self.base_rejection
        if self._rejected > (floor + self._slack(floor, sent, early=True)) * sent:
            self._judge(now, complete=False)

    def _sigma(self, base: float, n: int) -> float:
        # The spread of a rate measured on n replies around the base, the base's own
        # uncertainty included when it was measured.
        var = max(base, 0.003) * (1 - min(base, 0.99))
        return math.sqrt(var / n + (var / self._base_n if self._base_n else 0.0))

    def _slack(self, base: float, n: int, early: bool = False) -> float:
        # Three standard deviations plus 2 points before a rate counts as more than the
        # base explains; four plus 3 for the early test, which runs at every reply.
        if early:
            return 4 * self._sigma(base, n) + 0.03
        return 3 * self._sigma(base, n) + 0.02

    def _fell(self, rate: float, n: int) -> bool:
        """Whether ``rate`` (on ``n`` replies) is clearly below the last counted one: by
        three standard deviations of the difference of the two, plus 2 points."""
        last, last_n = self._run_rate, self._run_n
        spread = math.sqrt(last * (1 - last) / last_n + rate * (1 - rate) / n)
        return rate < last - 3 * spread - 0.02

    def _judge(self, now: float, complete: bool) -> None:
        """Close the epoch: cut, confirm a load-independent base, or speed up.

        Only ``complete`` epochs (most of their sends answered) count toward the
        verdict that rejections do not depend on load: the replies that come back first
        are skewed (a bucket spends what it saved on the earliest arrivals).
        """
        seen = self._seen
        rate = self._rejected / seen
        base = self.base_rejection
        pacer = self.pacer
        # What was sent per second in this epoch: every send counted, so this never
        # overstates (a young epoch understates it, which only cuts deeper).
        sent_rate = self._sent / max(now - self._epoch_start, 1e-3)
        if rate > base + self._slack(base, seen):
            if not self._episode:
                self._episode = True
                self._episode_rate = pacer.rate
                self._run = 0
            if complete:
                if self._run and not self._clamped and not self._fell(rate, seen):
                    self._run += 1
                    self._run_seen += seen
                    self._run_rejected += self._rejected
                else:
                    self._run = 1
                    self._run_seen, self._run_rejected = seen, self._rejected
                    self._restore = pacer.rate
                if self._run > CONFIRM:
                    # The rejection rate held while the sending fell to what was accepted:
                    # it does not depend on load. Learn it; take back the pace before the
                    # run (a limit found before it stays found).
                    self.base_rejection = min(0.99, self._run_rejected / self._run_seen)
                    self._base_n = self._run_seen
                    self._known = 0.0  # measured as if the faults were load: unknown
                    pacer.set_rate(self._restore, now)
                    self._episode = False
                    self._new_epoch(now)
                    return
            else:
                self._run = 0  # clearly worse: whatever this is, it depends on load
            self._run_rate, self._run_n = rate, seen
            # Pace just under what the server accepted (its base faults aside), but at
            # most MAX_CUT lower than the pace in force (or, unpaced, than what was
            # sent): a small epoch's accepted share is noisy.
            basis = pacer.rate if pacer.rate is not None else sent_rate
            self._known = (1.0 - rate) * sent_rate / (1.0 - base)
            target = CUT_MARGIN * self._known
            bound = basis * (MAX_CUT if complete else EARLY_CUT)
            self._clamped = target < bound
            pacer.set_rate(max(bound, min(basis, target)), now)
            self._growth = GROWTH
            self.cuts += 1
        else:
            if self._episode and not self._fell(rate, seen):
                # Below the threshold, yet not clearly below the epochs that were cut:
                # the cuts were not shown to help. Take the pace from before them back
                # (rejections just over the threshold must not ratchet the pace down).
                self._known = 0.0
                pacer.set_rate(self._episode_rate, now)
            self._episode = False
            self._run = 0
            if self.cold:
                self.cold = False  # the first clean epoch: the lane's full width
            # The base only rises through the test above; it eases down when epochs are
            # clearly below it, so a fault rate that has passed is forgotten.
            if rate < base - self._sigma(base, seen):
                self.base_rejection = base + 0.1 * (rate - base)
            rate_now = pacer.rate
            if rate_now is not None and sent_rate >= 0.8 * rate_now:
                if self._known and rate_now >= CUT_MARGIN * self._known:
                    # Past what the last cut measured: probe gently.
                    self._growth = GROWTH
                pacer.set_rate(rate_now * (1 + self._growth), now)
                self._growth = min(MAX_GROWTH, 2 * self._growth)
        self._new_epoch(now)

    def _new_epoch(self, now: float) -> None:
        self.epoch += 1
        self._epoch_start = now
        self._sent = self._seen = self._rejected = self._back = 0
        self._wake()
