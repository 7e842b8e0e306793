"""The process sandbox's deadline thread: every armed action fires, in time order, unless
cancelled, whatever order the deadlines were armed in."""

from __future__ import annotations

import threading

from rlm.sandbox.deadlines import Deadlines


def test_an_earlier_deadline_armed_after_a_later_one_fires_first() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    first = threading.Event()
    later = deadlines.arm(60.0, fired.append, "later")
    deadlines.arm(0.05, lambda: (fired.append("soon"), first.set()))
    assert first.wait(30)
    assert fired == ["soon"]
    deadlines.cancel(later)


def test_deadlines_armed_in_any_order_fire_in_time_order_and_cancelled_ones_never() -> None:
    deadlines = Deadlines()
    fired: list[int] = []
    done = threading.Event()
    delays = [0.3, 0.1, 0.5, 0.2, 0.4]
    tokens = {}
    for delay in delays:
        tokens[delay] = deadlines.arm(delay, fired.append, int(delay * 10))
    deadlines.cancel(tokens[0.4])
    deadlines.arm(0.6, done.set)
    assert done.wait(30)
    assert fired == [1, 2, 3, 5]
