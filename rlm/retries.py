"""When a failed model call is tried again, after how long, and when it fails for good.

Two kinds of failure, two bounds:

- **Refusals** (429, 503, Anthropic's 529 overloaded: "not now"): retried until
  ``retry_timeout_s`` has passed since the call began, not for a number of attempts,
  which a 429 storm of the client's own making would burn in seconds. Every wait the server asks for
  (``RateLimitError.retry_after``, read by the adapter) is honoured exactly, never
  shortened; a wait longer than ``max_retry_wait_s`` fails the call at once, with
  the delay in the error. Without a stated wait, a short jittered back-off: the
  lane's pacing, not each call's back-off, is what keeps the server's load in hand.
- **Other transient failures** (408, 409, other 5xx, timeouts, dropped connections):
  at most ``max_retries`` retries, with jittered exponential back-off, within the
  same deadline. A connection refused outright is retried only for a moment: a
  server that is not running does not start because we wait.

Everything else (4xx, a reply that is not a completion) fails at once. This module
holds only the decision; sleeping, counting and the error text are the client's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlm.errors import LLMConnectionError, LLMError, LLMTimeoutError, ResponseError

# Statuses that mean "not now": rate limited, overloaded (503; Anthropic's 529).
REFUSAL_STATUS = frozenset({429, 503, 529})
RETRYABLE_STATUS = frozenset({408, 409})
# A refused connection is retried for at most this long (seconds) before it fails.
REFUSED_CONNECTION_S = 1.5


def is_refusal(error: BaseException) -> bool:
    """True for a 429, 503 or 529 (a rate limit or an overloaded server), however
    delivered."""
    return isinstance(error, LLMError) and error.status in REFUSAL_STATUS


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """A call about to be retried, for live displays: which model, what failed, the
    attempt that failed (1 = the first), the wait before the next, and whether it was a
    refusal (429/503/529) rather than a fault."""

    model: str
    failure: str
    attempt: int
    wait_s: float
    refusal: bool

    def __str__(self) -> str:
        return (f"{self.model}: attempt {self.attempt} failed ({self.failure}); "
                f"next try in {self.wait_s:.1f} s")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a failed attempt: wait ``delay`` seconds and retry, or stop
    (``delay`` None) for the reason in ``why`` (empty: the usual final error)."""

    delay: float | None
    why: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The bounds: ``max_retries`` for transient failures, ``retry_timeout_s`` for all
    retrying, ``max_retry_wait_s`` for any single wait a server asks for."""

    max_retries: int = 6
    retry_timeout_s: float = 300.0
    max_retry_wait_s: float = 120.0

    def verdict(self, error: BaseException, *, failures: int, backoffs: int,
                elapsed: float) -> Verdict:
        """Decide after one failed attempt. ``failures`` counts the transient failures
        so far (this one included), ``backoffs`` the refusals that stated no wait
        (this one included), ``elapsed`` the seconds since the call began."""
        if is_refusal(error):
            assert isinstance(error, LLMError)
            asked = error.retry_after
            if asked is not None:
                if asked > self.max_retry_wait_s:
                    return Verdict(None, (
                        f"the server asked to wait {asked:g} s, more than max_retry_wait_s="
                        f"{self.max_retry_wait_s:g}; raise max_retry_wait_s to wait that long"
                    ))
                # Never sooner than asked; a little later, so that the calls one
                # refusal wave sent back do not all return in the same instant.
                delay = asked + random.uniform(0.0, min(0.1 * asked, 1.0))
            else:
                delay = min(2.0, 0.25 * 2 ** (backoffs - 1)) * random.uniform(0.75, 1.25)
        elif self._transient(error):
            if failures > self.max_retries:
                return Verdict(None)
            if isinstance(error, LLMConnectionError) and error.refused:
                if elapsed >= REFUSED_CONNECTION_S:
                    return Verdict(None)
                delay = min(0.5, 0.125 * 2 ** (failures - 1))
            else:
                asked = error.retry_after if isinstance(error, LLMError) else None
                if asked is not None and asked > self.max_retry_wait_s:
                    return Verdict(None, (
                        f"the server asked to wait {asked:g} s, more than max_retry_wait_s="
                        f"{self.max_retry_wait_s:g}; raise max_retry_wait_s to wait that long"
                    ))
                delay = asked if asked is not None else (
                    min(8.0, 0.5 * 2 ** (failures - 1)) * random.uniform(0.75, 1.25)
                )
        else:
            return Verdict(None)
        if elapsed + delay > self.retry_timeout_s:
            return Verdict(None, (
                f"still failing after {elapsed:.0f} s, and the next try would pass "
                f"retry_timeout_s={self.retry_timeout_s:g}"
            ))
        return Verdict(delay)

    @staticmethod
    def _transient(error: BaseException) -> bool:
        if isinstance(error, LLMTimeoutError | LLMConnectionError):
            return True
        if not isinstance(error, LLMError) or isinstance(error, ResponseError):
            return False
        status = error.status
        return status is not None and (status in RETRYABLE_STATUS or status >= 500)
