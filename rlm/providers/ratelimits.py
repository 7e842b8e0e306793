"""What rate-limit and retry headers say, read into small typed values.

- ``RateLimits``: a reply's request and token limits, what is left of them and when
  they reset, as OpenAI (``x-ratelimit-*``) and Anthropic (``anthropic-ratelimit-*``)
  send them on every reply.
- ``retry_after_seconds``: the wait a refusal asks for (``retry-after-ms``,
  ``retry-after`` in seconds or as an HTTP date, and a LiteLLM proxy's
  ``llm_provider-retry-after(-ms)``); the longest of them, so no retry comes sooner
  than any of them asked.
- ``parse_duration``: "6m0s", "1.5s", "250ms", "1h2m", plain seconds, RFC 3339 dates.

Every parser tolerates garbage: a value it cannot read is None, never an exception.
This module must not decide what to do with the values (pacing does that).
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

# Go-style durations as OpenAI sends them: "6m0s", "1.5s", "250ms", "1h2m3s", "20us".
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# Longer than this is not a wait anyone means (and would overflow a timer).
_MAX_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A reply's rate-limit headers: per-minute limits, what is left, seconds to reset.

    Any field may be None (the provider did not send it, or sent garbage). ``*_reset_s``
    is how long until that limit is whole again, from when the reply was read.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, name) is not None for name in self.__slots__)


def _finite(value: float) -> float | None:
    if math.isnan(value):
        return None
    return min(max(value, 0.0), _MAX_S)


def parse_duration(text: str | None, now: float | None = None) -> float | None:
    """Seconds in ``text``: "6m0s", "1.5s", "250ms", "1h2m", "20" (seconds), or an RFC 3339
    / HTTP date (seconds from ``now``, a ``time.time()`` value, until then). None if
    unreadable; a date in the past is 0."""
    if text is None:
        return None
    text = str(text).strip()
    if not text:
        return None
    try:
        return _finite(float(text))
    except ValueError:
        pass
    pos, total, matched = 0, 0.0, False
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
        matched = True
    if matched and pos == len(text):
        return _finite(total)
    return _seconds_until(text, now)


def _seconds_until(text: str, now: float | None) -> float | None:
    when: float | None = None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        parsed = email.utils.parsedate_tz(text)
        if parsed is not None:
            when = float(email.utils.mktime_tz(parsed))
    if when is None:
        return None
    return _finite(max(0.0, when - (time.time() if now is None else now)))


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(float(value.strip()))
    except (ValueError, OverflowError):
        return None
    return number if number >= 0 else None


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """The longest wait any retry header of ``headers`` asks for, in seconds, or None."""
    if not headers:
        return None
    waits = []
    for name, scale in (("retry-after-ms", 1e-3), ("llm_provider-retry-after-ms", 1e-3)):
        value = headers.get(name)
        if value is not None:
            try:
                seconds = _finite(float(value) * scale)
            except ValueError:
                seconds = None
            if seconds is not None:
                waits.append(seconds)
    for name in ("retry-after", "llm_provider-retry-after"):
        seconds = parse_duration(headers.get(name), now)
        if seconds is not None:
            waits.append(seconds)
    return max(waits) if waits else None


def openai_limits(headers: Mapping[str, str], now: float | None = None) -> RateLimits | None:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (None: absent)."""
    get = headers.get
    limit_requests = get("x-ratelimit-limit-requests")
    limit_tokens = get("x-ratelimit-limit-tokens")
    if limit_requests is None and limit_tokens is None:
        remaining = get("x-ratelimit-remaining-requests") or get("x-ratelimit-remaining-tokens")
        if remaining is None:
            return None
    limits = RateLimits(
        _int(limit_requests),
        _int(get("x-ratelimit-remaining-requests")),
        parse_duration(get("x-ratelimit-reset-requests"), now),
        _int(limit_tokens),
        _int(get("x-ratelimit-remaining-tokens")),
        parse_duration(get("x-ratelimit-reset-tokens"), now),
    )
    return limits or None


def anthropic_limits(headers: Mapping[str, str], now: float | None = None) -> RateLimits | None:
    """Anthropic's ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (resets
    are RFC 3339 dates); without the combined tokens headers, the input-tokens ones."""
    get = headers.get
    prefix = "anthropic-ratelimit-"
    kind = "tokens"
    if get(prefix + "tokens-limit") is None and get(prefix + "tokens-remaining") is None:
        kind = "input-tokens"
    limits = RateLimits(
        _int(get(prefix + "requests-limit")),
        _int(get(prefix + "requests-remaining")),
        parse_duration(get(prefix + "requests-reset"), now),
        _int(get(prefix + f"{kind}-limit")),
        _int(get(prefix + f"{kind}-remaining")),
        parse_duration(get(prefix + f"{kind}-reset"), now),
    )
    return limits or None
