"""What the live views show of the client's retries, rate limits and estimated usage,
and that the status line's clock keeps ticking while nothing happens."""

from __future__ import annotations

import io
import re
import threading
from typing import Any

from rich.console import Console
from rlm_support import wait_until

from rlm.display.metrics import metrics_from_events
from rlm.display.progress import RunProgress
from rlm.display.terminal import LiveDisplay


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=160, color_system=None), out


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "t": 0.0, "run_id": "r1", "depth": 0, **fields}


def test_the_status_line_clock_ticks_while_waiting_for_the_root_model() -> None:
    console, out = terminal()
    line = RunProgress(console)
    try:
        line(event("run_start", max_iterations=20))
        line(event("root_request", iteration=1))
        # No further event: the line is redrawn with a later time all the same.
        assert wait_until(lambda: len(set(re.findall(r"waiting for the root model · ([0-9.]+ m?s)",
                                                     out.getvalue()))) >= 3, timeout=30)
    finally:
        line.close()


def test_the_status_line_says_what_is_being_retried_and_when() -> None:
    console, out = terminal()
    line = RunProgress(console)
    try:
        line(event("root_request", iteration=1))
        line(event("retry", role="root", model="m", failure="503: overloaded", attempt=2,
                   wait_s=1.5, refusal=True))
        assert wait_until(lambda: "retrying m after 503: overloaded (attempt 2; next try in 1.50 s)"
                          in out.getvalue(), timeout=30)
    finally:
        line.close()


def test_the_live_view_shows_root_retries_and_sums_up_rate_limits() -> None:
    console, out = terminal()
    view = LiveDisplay(console)
    view(event("retry", role="root", model="m", failure="ClientConnectorError: refused",
               attempt=1, wait_s=0.25, refusal=False))
    view(event("retry", role="sub", model="s", failure="429: slow down", attempt=1, wait_s=0.1,
               refusal=True))
    view(event("rate_limited", role="sub", model="s", refusals=40, waited_s=12.5,
               limits={"rpm": 500.0, "tpm": None, "rate_per_s": None, "rpm_from": "headers",
                       "tpm_from": None}))
    text = out.getvalue()
    assert "↻ m: attempt 1 failed (ClientConnectorError: refused); next try in 0.25 s" in text
    assert "429: slow down" not in text  # a batch's retries are summed up, not listed
    assert "⏸ rate limits held the sub model s back 12.50 s, 40 refusals; pacing to rpm 500 (headers)" in text


def test_the_final_panel_counts_refusals_waits_and_estimated_usage() -> None:
    console, out = terminal()
    view = LiveDisplay(console)
    view(event("run_start", query="q", model="m", max_iterations=5))
    usage = {"calls": 3, "prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33,
             "rate_limit_hits": 7, "rate_limit_wait_s": 4.0, "estimated_calls": 2}
    view(event("run_end", answer="42", stopped_reason="final", iterations=1, elapsed_s=5.0,
               sub_calls=2, usage={"root": usage, "sub": usage}))
    assert "rate limited 14× (held 8.00 s) · usage estimated" in out.getvalue()
    rows = dict(metrics_from_events(view_events(usage)).rows())
    assert rows["Rate limits"] == "14 refusals drawn, calls held back 8.00 s in all"
    assert rows["Usage"] == "estimated for 4 calls (the server reported none)"


def view_events(usage: dict[str, Any]) -> list[dict[str, Any]]:
    return [event("run_start", query="q", model="m", max_iterations=5),
            event("run_end", answer="42", stopped_reason="final", iterations=1, elapsed_s=5.0,
                  sub_calls=2, usage={"root": usage, "sub": usage})]


def test_the_status_line_is_safe_to_feed_from_many_threads() -> None:
    console, _ = terminal()
    line = RunProgress(console)
    try:
        threads = [threading.Thread(target=lambda i=i: [line(event(
            "retry", role="sub", model="s", failure="429", attempt=k, wait_s=0.1, refusal=True))
            for k in range(200)]) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        line.close()
