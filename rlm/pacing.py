"""Pacing: how fast one (endpoint, model) lane may send, by requests and by tokens.

A ``Pacer`` answers one question for the limiter, "how long until a request costing
``cost`` tokens may go?", from three sources, the strictest winning:

- **Budgets** of requests and of tokens per minute (``Budget``, a token bucket holding
  a minute's worth and refilled continuously), given by the user (``rpm=``, ``tpm=``)
  or learned from the provider's rate-limit headers. A reply's "remaining" figures
  pull the budget down to what the server says is left, minus what was sent after
  that request, so pacing follows the server's own count instead of waiting for 429s.
- A **learned rate** in requests per second, set by the limiter's adaptation when
  rejections show the server accepts less than is sent (a limit that sends no
  headers). Sends are spaced ``1/rate`` apart with a small burst tolerance.

The pacer is synchronous and clock-agnostic (every method takes ``now``), so the
property tests drive it with a fake clock. It must not hold queues, timers or the
adaptation rule: those are the limiter's (``rlm.limiter``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from rlm.errors import ConfigError
from rlm.providers.ratelimits import RateLimits

# Budgets are per minute: the window providers state their limits in.
MINUTE_S = 60.0
# How far ahead of its slot a paced send may go (seconds): absorbs timer jitter
# without letting a burst through.
RATE_TOLERANCE_S = 0.02
# The learned rate never goes below this (requests per second).
MIN_RATE = 0.05
# Waits shorter than this are no wait (float dust must not arm zero-length timers).
EPSILON_S = 1e-6


def check_limits(limits: Mapping[str, Mapping[str, float]] | None, rpm: float | None = None,
                 tpm: float | None = None) -> dict[str, dict[str, float]]:
    """Validate given limits: ``{model: {"rpm": N, "tpm": N}}``, plus ``rpm``/``tpm``
    for every model (kept under "*"); ``ConfigError`` names what is wrong."""
    table: dict[str, dict[str, float]] = {}
    if rpm is not None or tpm is not None:
        table["*"] = _check_pair("every model", {"rpm": rpm, "tpm": tpm})
    if limits is None:
        return table
    if not isinstance(limits, Mapping):
        raise ConfigError('limits must map model names to {"rpm": N, "tpm": N}')
    for model, pair in limits.items():
        if not isinstance(pair, Mapping):
            raise ConfigError(f'the limits of {model!r} must be {{"rpm": N, "tpm": N}}, '
                              f"not {pair!r}")
        table[str(model)] = {**table.get("*", {}), **_check_pair(str(model), pair)}
    return table


def parse_limit(spec: str) -> tuple[str, dict[str, float]]:
    """Parse ``MODEL=rpm:N,tpm:N`` (either part may be left out) into a limits entry."""
    model, sep, rest = spec.rpartition("=")
    pair: dict[str, float | None] = {}
    try:
        for part in rest.split(","):
            key, colon, value = part.strip().partition(":")
            if not colon:
                raise ValueError(part)
            pair[key.strip()] = float(value.replace("_", ""))
    except ValueError:
        pair = {}
    if not sep or not model or not pair:
        raise ConfigError(
            f"a limit is MODEL=rpm:N,tpm:N (requests and tokens per minute; either may be "
            f"left out), e.g. gpt-5-mini=rpm:5000,tpm:2000000, not {spec!r}"
        )
    return model, _check_pair(model, pair)


def _check_pair(model: str, pair: Mapping[str, float | None]) -> dict[str, float]:
    unknown = set(pair) - {"rpm", "tpm"}
    if unknown:
        raise ConfigError(f"unknown limit {sorted(unknown)[0]!r} for {model}; use rpm and tpm")
    out: dict[str, float] = {}
    for key in ("rpm", "tpm"):
        value = pair.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0
        ):
            raise ConfigError(f"{key} for {model} must be a positive number, not {value!r}")
        out[key] = float(value)
    return out


class Budget:
    """A token bucket of ``capacity`` units refilled at ``capacity`` per minute.

    ``level`` may go below zero when the server's own count says more was spent than
    this side knew; sends then wait until the refill has paid that back.
    """

    __slots__ = ("at", "capacity", "level", "rate")

    def __init__(self, capacity: float, now: float, level: float | None = None) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / MINUTE_S
        self.level = self.capacity if level is None else float(level)
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` units are available (0: now). A cost above the capacity
        waits for a full bucket (the caller refuses such requests before they queue)."""
        self._refill(now)
        need = min(cost, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate

    def take(self, cost: float, now: float) -> None:
        """Spend ``cost`` units (after ``wait`` said 0)."""
        self._refill(now)
        self.level -= min(cost, self.capacity)

    def give(self, amount: float, now: float) -> None:
        """Return ``amount`` units (never above the capacity)."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def resize(self, capacity: float, now: float) -> None:
        """Adopt a new per-minute capacity (the level keeps what was already spent)."""
        self._refill(now)
        spent = self.capacity - self.level
        self.capacity = float(capacity)
        self.rate = self.capacity / MINUTE_S
        self.level = self.capacity - spent

    def sync(self, remaining: float, now: float) -> None:
        """Lower the level to what the server says is ``remaining`` (never raise it: this
        side's refill does that, at the stated per-minute pace)."""
        self._refill(now)
        if remaining < self.level:
            self.level = remaining


@dataclass(frozen=True, slots=True)
class PacingState:
    """What a lane's pacing knows right now, for usage and the live view."""

    rpm: float | None
    tpm: float | None
    rate_per_s: float | None
    rpm_from: str | None
    tpm_from: str | None

    def to_dict(self) -> dict[str, float | str | None]:
        """Plain JSON-ready dict (for trajectories)."""
        rate = None if self.rate_per_s is None else round(self.rate_per_s, 3)
        return {"rpm": self.rpm, "tpm": self.tpm, "rate_per_s": rate,
                "rpm_from": self.rpm_from, "tpm_from": self.tpm_from}


class Pacer:
    """Request and token budgets plus a learned request rate, for one lane.

    ``rpm``/``tpm`` given here are fixed caps; headers can lower what is left of them
    but never raise them. Without them, budgets appear when a reply's headers state
    limits.
    """

    __slots__ = ("_given_rpm", "_given_tpm", "_tat", "rate", "requests", "tokens")

    def __init__(self, rpm: float | None = None, tpm: float | None = None,
                 now: float = 0.0) -> None:
        self._given_rpm = rpm
        self._given_tpm = tpm
        self.requests: Budget | None = Budget(rpm, now) if rpm else None
        self.tokens: Budget | None = Budget(tpm, now) if tpm else None
        self.rate: float | None = None
        self._tat = 0.0  # theoretical arrival time of the next paced send (GCRA)

    @property
    def counts_tokens(self) -> bool:
        """True when a token budget is known, so requests need a token estimate."""
        return self.tokens is not None

    @property
    def active(self) -> bool:
        """True when anything here may hold a send back."""
        return self.requests is not None or self.tokens is not None or self.rate is not None

    def delay(self, cost: float, now: float) -> float:
        """Seconds until a request of ``cost`` tokens may be sent (0: now)."""
        wait = 0.0
        if self.rate is not None:
            wait = self._tat - RATE_TOLERANCE_S - now
        requests = self.requests
        if requests is not None:
            wait = max(wait, requests.wait(1.0, now))
        tokens = self.tokens
        if tokens is not None and cost:
            wait = max(wait, tokens.wait(cost, now))
        return wait if wait > EPSILON_S else 0.0

    def take(self, cost: float, now: float) -> None:
        """Account one send of ``cost`` tokens (after ``delay`` said 0)."""
        rate = self.rate
        if rate is not None:
            self._tat = max(self._tat, now) + 1.0 / rate
        if self.requests is not None:
            self.requests.take(1.0, now)
        if self.tokens is not None and cost:
            self.tokens.take(cost, now)

    def refund(self, cost: float, now: float) -> None:
        """A send was refused: give back what it was charged. (If the server counted it
        after all, its next reply's headers take it again.)"""
        if self.requests is not None:
            self.requests.give(1.0, now)
        if self.tokens is not None and cost:
            self.tokens.give(cost, now)

    def set_rate(self, rate: float | None, now: float) -> None:
        """Adopt a learned request rate (None: no rate pacing)."""
        if rate is not None:
            rate = max(MIN_RATE, rate)
            if self.rate is not None and self._tat > now:
                # Re-space what was already promised at the new pace.
                self._tat = now + (self._tat - now) * self.rate / rate
        self.rate = rate

    def too_large(self, cost: float) -> bool:
        """True when ``cost`` tokens can never fit the token budget."""
        return self.tokens is not None and cost > self.tokens.capacity

    def learn(self, limits: RateLimits, sent_after: int, tokens_after: float,
              now: float, age: float = 0.0) -> None:
        """Follow what a reply's rate-limit headers say. The server counted them when the
        request arrived, ``age`` seconds ago (it has refilled since), and before the
        ``sent_after`` requests and ``tokens_after`` tokens sent after it (it is spending
        those now)."""
        if limits.limit_requests:
            self.requests = self._budget(self.requests, limits.limit_requests,
                                         self._given_rpm, now)
        if limits.limit_tokens:
            self.tokens = self._budget(self.tokens, limits.limit_tokens, self._given_tpm, now)
        requests, tokens = self.requests, self.tokens
        if requests is not None and limits.remaining_requests is not None:
            requests.sync(limits.remaining_requests + requests.rate * age - sent_after, now)
        if tokens is not None and limits.remaining_tokens is not None:
            tokens.sync(limits.remaining_tokens + tokens.rate * age - tokens_after, now)

    @staticmethod
    def _budget(budget: Budget | None, limit: float, given: float | None,
                now: float) -> Budget:
        capacity = min(limit, given) if given else limit
        if budget is None:
            return Budget(capacity, now)
        if budget.capacity != capacity:
            budget.resize(capacity, now)
        return budget

    def state(self) -> PacingState:
        """The limits in force, per minute, and where each came from."""
        rpm = self.requests.capacity if self.requests is not None else None
        tpm = self.tokens.capacity if self.tokens is not None else None
        return PacingState(
            rpm, tpm, self.rate,
            None if rpm is None else ("given" if rpm == self._given_rpm else "headers"),
            None if tpm is None else ("given" if tpm == self._given_tpm else "headers"),
        )
