"""Per-model rate limits: request and token buckets, and what they report.

Holds :class:`Limit` (one model's requests-per-second/-minute and tokens-per-minute
budgets), :class:`RateLimits` (a bucket set per model, admitting or refusing each
request by its estimated cost) and the formats providers report them in: OpenAI's
``x-ratelimit-*`` durations (``"6m0s"``, ``"1.5s"``, ``"250ms"``) and Anthropic's RFC 3339
reset times. It must not hold error bodies or HTTP: the protocol modules render a
refusal in their own shapes.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Admission",
    "BucketState",
    "Limit",
    "RateLimits",
    "format_duration",
    "rfc3339_in",
]

# Completion tokens a request without max_tokens is assumed to cost, as a provider's
# estimate (and the client's budget ledger) assumes before the reply is known.
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class Limit:
    """One model's rate limits; any left as None is not enforced.

    ``rps`` or ``rpm``: requests per second or per minute, a bucket holding ``burst``
    requests (default: one second's worth, at least 1). ``tpm``: tokens per minute,
    where a request costs its prompt's tokens (characters / 4) plus its ``max_tokens``
    (or ``default_max_tokens``), a bucket holding one minute's worth (``token_burst``
    changes it). ``input_tpm`` / ``output_tpm``: Anthropic's separate input (prompt) and
    output (``max_tokens``) budgets, a minute's worth each. A request is admitted only
    when every bucket has room; one that could never fit a bucket is refused as too
    large.
    """

    rps: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    input_tpm: float | None = None
    output_tpm: float | None = None
    burst: float | None = None
    token_burst: float | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        if self.rps is not None and self.rpm is not None:
            raise ValueError("give rps or rpm, not both")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value <= 0 and f.name != "default_max_tokens":
                raise ValueError(f"{f.name} must be > 0, got {value!r}")
        if self.default_max_tokens < 0:
            raise ValueError("default_max_tokens must be >= 0")

    @classmethod
    def of(cls, value: Limit | Mapping[str, Any]) -> Limit:
        """A Limit from itself or a mapping of its field names (``{"rpm": 500}``)."""
        if isinstance(value, Limit):
            return value
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown limit {unknown[0]!r}; use {', '.join(sorted(names))}")
        return cls(**dict(value))


@dataclass(frozen=True)
class BucketState:
    """One bucket after a request was weighed: its name (``requests``, ``tokens``,
    ``input_tokens``, ``output_tokens``), per-minute limit, whole units left and seconds
    until it is full again."""

    name: str
    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Admission:
    """The verdict on one request: ``ok``, or refused by ``bucket`` (whose ``wait_s`` says
    when the request would fit, ``None`` when it never can: ``requested`` > ``limit``),
    and every bucket's state to report."""

    ok: bool
    states: tuple[BucketState, ...]
    bucket: str | None = None
    wait_s: float | None = None
    requested: int = 0
    limit: int = 0


class _Bucket:
    __slots__ = ("at", "capacity", "level", "name", "per_minute", "rate")

    def __init__(self, name: str, per_minute: float, capacity: float) -> None:
        self.name = name
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = capacity
        self.level = capacity
        self.at = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def state(self) -> BucketState:
        reset = (self.capacity - self.level) / self.rate if self.rate else 0.0
        return BucketState(self.name, int(self.per_minute), int(self.level), max(0.0, reset))


class RateLimits:
    """Bucket sets per model, built from ``{model: Limit | mapping}``; the key ``"*"``
    gives every other model its own buckets with those limits."""

    def __init__(self, limits: Mapping[str, Limit | Mapping[str, Any]] | None = None) -> None:
        self._limits = {name: Limit.of(value) for name, value in (limits or {}).items()}
        self._buckets: dict[str, tuple[Limit, list[_Bucket]]] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._limits)

    def _for(self, model: str) -> tuple[Limit, list[_Bucket]] | None:
        found = self._buckets.get(model)
        if found is not None:
            return found
        limit = self._limits.get(model, self._limits.get("*"))
        if limit is None:
            return None
        buckets: list[_Bucket] = []
        per_second = limit.rps if limit.rps is not None else (
            limit.rpm / 60 if limit.rpm is not None else None
        )
        if per_second is not None:
            capacity = limit.burst if limit.burst is not None else max(1.0, per_second)
            buckets.append(_Bucket("requests", per_second * 60, capacity))
        for name, per_minute in (
            ("tokens", limit.tpm),
            ("input_tokens", limit.input_tpm),
            ("output_tokens", limit.output_tpm),
        ):
            if per_minute is not None:
                capacity = limit.token_burst if limit.token_burst is not None else per_minute
                buckets.append(_Bucket(name, per_minute, capacity))
        self._buckets[model] = (limit, buckets)
        return limit, buckets

    def admit(self, model: str, prompt_tokens: int, max_tokens: int | None) -> Admission | None:
        """Weigh one request to ``model`` and take its cost from every bucket if all have
        room; None when the model has no limits."""
        with self._lock:
            found = self._for(model)
            if found is None:
                return None
            limit, buckets = found
            output = max_tokens if max_tokens is not None else limit.default_max_tokens
            costs = {
                "requests": 1,
                "tokens": prompt_tokens + output,
                "input_tokens": prompt_tokens,
                "output_tokens": output,
            }
            now = time.monotonic()
            refused: Admission | None = None
            for bucket in buckets:
                bucket.refill(now)
                cost = costs[bucket.name]
                if cost > bucket.capacity:
                    refused = Admission(
                        False, (), bucket.name, None, cost, int(bucket.per_minute)
                    )
                    break
                if cost > bucket.level:
                    wait = (cost - bucket.level) / bucket.rate
                    if refused is None or (refused.wait_s or 0) < wait:
                        refused = Admission(
                            False, (), bucket.name, wait, cost, int(bucket.per_minute)
                        )
            if refused is None:
                for bucket in buckets:
                    bucket.level -= costs[bucket.name]
            states = tuple(bucket.state() for bucket in buckets)
            if refused is None:
                return Admission(True, states)
            return Admission(
                False, states, refused.bucket, refused.wait_s, refused.requested, refused.limit
            )


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it (Go's style): ``"250ms"``,
    ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``; ``"0s"`` for nothing left to wait."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{secs}s"


def rfc3339_in(seconds: float) -> str:
    """The UTC time ``seconds`` from now in RFC 3339, as Anthropic's reset headers say it."""
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=max(0.0, seconds))
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
