"""What rate-limit and retry headers say, how budgets pace, and when a call is retried.

Pure functions and small values, so no server: the parsers of rlm.providers.ratelimits,
the budgets of rlm.pacing on a fake clock, and rlm.retries' verdicts.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from rlm.errors import ConfigError, LLMConnectionError, LLMError, RateLimitError, ResponseError
from rlm.pacing import Budget, Pacer, check_limits
from rlm.providers.ratelimits import (
    RateLimits,
    anthropic_limits,
    openai_limits,
    parse_duration,
    retry_after_seconds,
)
from rlm.retries import RetryPolicy


@pytest.mark.parametrize(("text", "seconds"), [
    ("6m0s", 360.0), ("1.5s", 1.5), ("250ms", 0.25), ("1h2m3s", 3723.0), ("20", 20.0),
    ("0.5", 0.5), ("17us", 17e-6), (" 2s ", 2.0),
])
def test_durations_in_every_form_providers_send(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("garbage", ["", "soon", "5 parsecs", "1.2.3s", "ms", "-", "NaN", "1s2x"])
def test_garbage_durations_are_none_not_errors(garbage: str) -> None:
    assert parse_duration(garbage) is None


def test_an_rfc3339_date_is_the_seconds_until_it() -> None:
    now = time.time()
    when = datetime.fromtimestamp(now, UTC) + timedelta(seconds=42)
    assert parse_duration(when.isoformat().replace("+00:00", "Z"), now) == pytest.approx(42, abs=1e-3)
    past = datetime.fromtimestamp(now, UTC) - timedelta(seconds=5)
    assert parse_duration(past.isoformat(), now) == 0.0


def test_a_negative_or_huge_wait_is_clamped() -> None:
    assert parse_duration("-3") == 0.0
    assert parse_duration("1e30") == 7 * 24 * 3600.0


def test_retry_after_takes_the_longest_of_every_header_that_asks() -> None:
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "1", "retry-after-ms": "2500"}) == 2.5
    # Through a LiteLLM proxy the upstream's wait arrives under its own name.
    assert retry_after_seconds({"llm_provider-retry-after": "7"}) == 7.0
    assert retry_after_seconds({"llm_provider-retry-after-ms": "400", "retry-after": "0"}) == 0.4
    assert retry_after_seconds({"retry-after": "garbage"}) is None
    assert retry_after_seconds({}) is None


def test_openai_rate_limit_headers_become_a_typed_value() -> None:
    limits = openai_limits({
        "x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999",
        "x-ratelimit-reset-requests": "12ms", "x-ratelimit-limit-tokens": "2000000",
        "x-ratelimit-remaining-tokens": "1999000", "x-ratelimit-reset-tokens": "6m0s",
    })
    assert limits == RateLimits(5000, 4999, 0.012, 2_000_000, 1_999_000, 360.0)
    assert openai_limits({"content-type": "application/json"}) is None
    assert openai_limits({"x-ratelimit-limit-requests": "many"}) is None


def test_anthropic_rate_limit_headers_become_the_same_typed_value() -> None:
    now = time.time()
    reset = (datetime.fromtimestamp(now, UTC) + timedelta(seconds=30)).isoformat()
    headers = {
        "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": reset,
        "anthropic-ratelimit-input-tokens-limit": "40000",
        "anthropic-ratelimit-input-tokens-remaining": "39000",
        "anthropic-ratelimit-input-tokens-reset": reset,
    }
    limits = anthropic_limits(headers, now)
    assert limits is not None
    assert (limits.limit_requests, limits.remaining_requests) == (50, 49)
    assert (limits.limit_tokens, limits.remaining_tokens) == (40_000, 39_000)
    assert limits.reset_tokens_s == pytest.approx(30, abs=1e-3)
    assert anthropic_limits({"anthropic-ratelimit-tokens-limit": "x"}) is None


def test_a_budget_refills_a_minutes_worth_per_minute() -> None:
    budget = Budget(600, now=0.0)        # 600 per minute: 10 per second
    assert budget.wait(600, 0.0) == 0.0
    budget.take(600, 0.0)
    assert budget.wait(1, 0.0) == pytest.approx(0.1)
    assert budget.wait(50, 2.0) == pytest.approx(3.0)


def test_a_header_lowers_the_budget_to_what_the_server_says_is_left() -> None:
    pacer = Pacer(now=0.0)
    assert not pacer.active
    pacer.learn(RateLimits(limit_requests=60, remaining_requests=3), sent_after=3, tokens_after=0,
                now=0.0)
    # 3 left when the server answered, 3 sent since: the next waits for a refill.
    assert pacer.delay(0, 0.0) == pytest.approx(1.0)
    assert pacer.state().rpm == 60 and pacer.state().rpm_from == "headers"


def test_given_limits_cap_what_headers_can_raise() -> None:
    pacer = Pacer(rpm=100, tpm=None, now=0.0)
    pacer.learn(RateLimits(limit_requests=10_000), 0, 0, 0.0)
    assert pacer.state().rpm == 100 and pacer.state().rpm_from == "given"


def test_a_refused_send_is_charged_back() -> None:
    pacer = Pacer(rpm=60, tpm=6000, now=0.0)
    for _ in range(60):
        pacer.take(100, 0.0)
    assert pacer.delay(100, 0.0) > 0
    pacer.refund(100, 0.0)
    assert pacer.delay(100, 0.0) == 0.0


def test_a_learned_rate_spaces_sends() -> None:
    pacer = Pacer(now=0.0)
    pacer.set_rate(10.0, 0.0)
    pacer.take(0, 0.0)
    assert pacer.delay(0, 0.0) == pytest.approx(0.1 - 0.02)
    assert pacer.delay(0, 0.1) == 0.0


def test_limits_are_checked_with_messages_that_name_the_problem() -> None:
    assert check_limits({"m": {"rpm": 10, "tpm": 1000}}, rpm=5) == {
        "*": {"rpm": 5.0}, "m": {"rpm": 10.0, "tpm": 1000.0}}
    with pytest.raises(ConfigError, match="unknown limit 'rps'"):
        check_limits({"m": {"rps": 1}})
    with pytest.raises(ConfigError, match="tpm for m must be a positive number"):
        check_limits({"m": {"tpm": -1}})
    with pytest.raises(ConfigError, match="rpm for every model"):
        check_limits(None, rpm=0)


POLICY = RetryPolicy(max_retries=2, retry_timeout_s=60.0, max_retry_wait_s=30.0)


def test_a_refusal_is_retried_after_exactly_the_wait_asked_or_later() -> None:
    verdict = POLICY.verdict(RateLimitError("slow down", status=429, retry_after=2.0),
                             failures=0, backoffs=0, elapsed=0.0)
    assert verdict.delay is not None and 2.0 <= verdict.delay <= 2.2


def test_a_wait_past_the_cap_fails_at_once_and_says_why() -> None:
    verdict = POLICY.verdict(RateLimitError("slow down", status=429, retry_after=90.0),
                             failures=0, backoffs=0, elapsed=0.0)
    assert verdict.delay is None
    assert "asked to wait 90 s, more than max_retry_wait_s=30" in verdict.why


def test_refusals_do_not_count_against_max_retries_but_stop_at_the_deadline() -> None:
    refusal = LLMError("overloaded", status=503)
    assert POLICY.verdict(refusal, failures=0, backoffs=50, elapsed=10.0).delay is not None
    late = POLICY.verdict(refusal, failures=0, backoffs=50, elapsed=59.5)
    assert late.delay is None and "retry_timeout_s=60" in late.why


def test_faults_stop_after_max_retries_and_client_errors_at_once() -> None:
    fault = LLMError("boom", status=500)
    assert POLICY.verdict(fault, failures=2, backoffs=0, elapsed=0.0).delay is not None
    assert POLICY.verdict(fault, failures=3, backoffs=0, elapsed=0.0).delay is None
    assert POLICY.verdict(LLMError("bad", status=400), failures=1, backoffs=0,
                          elapsed=0.0).delay is None
    assert POLICY.verdict(ResponseError("not json"), failures=1, backoffs=0,
                          elapsed=0.0).delay is None


def test_a_refused_connection_is_retried_only_for_a_moment() -> None:
    refused = LLMConnectionError("nothing listens", refused=True)
    waits = []
    elapsed, failures = 0.0, 0
    while True:
        failures += 1
        verdict = RetryPolicy(max_retries=10).verdict(refused, failures=failures, backoffs=0,
                                                      elapsed=elapsed)
        if verdict.delay is None:
            break
        waits.append(verdict.delay)
        elapsed += verdict.delay
    assert sum(waits) < 2.0
