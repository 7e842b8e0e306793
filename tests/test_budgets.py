"""Every run bounded and recorded: budgets that bind per call, deadlines, interruptions.

Scripted root model and echo sub-model on FakeLLMServer over real sockets. The server's
own request counter proves what was (and was not) sent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rlm_support import ROOT, SUB, make_rlm, repl, wait_until

from rlm import RLM, AsyncOpenAIClient
from rlm.errors import RunInterrupted
from rlm.loop import run_sync
from rlm.testing import FakeLLMServer, Fault, echo_responder, fetch_stats, spawn_fake_server
from rlm.trajectory import read_log

PAD = "x" * 200  # a sub-prompt of 205 chars: 51 prompt + 50 completion tokens on the fake


class Counting:
    """A responder that counts the sub-model requests it answers (any thread)."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], Any] = echo_responder) -> None:
        self.inner = inner
        self.count = itertools.count()
        self.sent = 0

    def __call__(self, messages: list[dict[str, Any]]) -> Any:
        self.sent = next(self.count) + 1
        return self.inner(messages)


FAN_OUT = repl(
    # Distinct prompts: identical ones in flight are sent once (single-flight).
    f"rs = llm_query_batch(['ECHO %04d {PAD[:195]}' % i for i in range(1000)])\n"
    "print(sum(r.startswith('[llm_query error: budget exhausted') for r in rs), 'refused')\n"
    "print(rs[-1])"
)


def cell_stdout(events: list[dict[str, Any]]) -> str:
    return "".join(e["stdout"] for e in events if e["type"] == "cell_result")


@pytest.mark.parametrize("budget", ["max_tokens", "max_cost_usd"])
def test_a_fan_out_of_1000_stops_within_the_in_flight_margin(
    closing: list[RLM], budget: str, capsys: pytest.CaptureFixture[str]
) -> None:
    subs = Counting()
    # 1 USD per 1M tokens: the cost budget is the token budget in dollars.
    prices = {ROOT: (1.0, 1.0), SUB: (1.0, 1.0)}
    limits: dict[str, Any] = {"max_tokens": 30_000} if budget == "max_tokens" else {
        "max_cost_usd": 0.03, "prices": prices}
    with FakeLLMServer(subs, scripts={ROOT: [FAN_OUT, repl("FINAL('too late')")]}) as srv:
        rlm = make_rlm(srv, **limits)
        closing.append(rlm)
        result = rlm.completion(context="c", query="q")
    usage = result.total_usage
    spent = usage.total_tokens if budget == "max_tokens" else usage.cost_usd * 1_000_000
    overshoot = spent - 30_000
    with capsys.disabled():
        print(f"\n[{budget}] 1,000-item fan-out: {subs.sent} sub-calls sent, spent {spent:,.0f} "
              f"of 30,000 tokens, overshoot {overshoot:,.0f} tokens")
    assert result.stopped_reason == "budget"
    assert result.answer is None  # the run ended at the end of the cell, before FINAL
    assert f"{budget}=" in (result.error or "")
    # Sending stopped: most of the 1,000 items were never sent...
    assert 100 < subs.sent < 400
    refused = int(cell_stdout(result.trajectory).split(" refused")[0].split()[-1])
    assert refused + subs.sent == 1000
    assert f"[llm_query error: budget exhausted ({budget}=" in cell_stdout(result.trajectory)
    # ...and the overshoot is at most the calls in flight (64 of ~101 tokens each).
    assert 0 <= overshoot <= 64 * 101
    assert usage.calls == subs.sent + 1


def test_the_deadline_stops_a_slow_batch_and_the_cell(closing: list[RLM]) -> None:
    subs = Counting()
    slow = repl("print('started')\nrs = llm_query_batch(['ECHO s%d' % i for i in range(400)])\nprint('never')")
    with FakeLLMServer(subs, scripts={ROOT: [slow, repl("FINAL('late')")]}, latency=0.25) as srv:
        rlm = make_rlm(srv, max_concurrency=4, max_time_s=1.5)
        closing.append(rlm)
        result = rlm.completion(context="c", query="q")
        # The cancelled requests are closed on the server's side too.
        assert wait_until(lambda: srv.in_flight == 0)
    assert result.stopped_reason == "budget"
    assert "max_time_s=1.5" in (result.error or "")
    # 400 items at 4 in flight and 0.25 s each would be 100 rounds; it stopped after ~6
    # (a loaded machine may fire the deadline a little late: a wide margin, far from 400).
    assert subs.sent <= 4 * 25
    cell = next(e for e in result.trajectory if e["type"] == "cell_result")
    assert cell["stdout"].startswith("started") and "never" not in cell["stdout"]
    assert cell["error"]  # the cell was stopped, and says so
    assert result.trajectory[-1]["type"] == "run_end"


def test_child_runs_spend_from_the_parents_budget(closing: list[RLM]) -> None:
    subs = Counting()

    def root(messages: list[dict[str, Any]]) -> str:
        if "Carry out the request" in messages[1]["content"]:  # a child run
            return repl(f"r = llm_query_batch(['ECHO ' + context[:12] + ' %02d {PAD[:180]}' % i "
                        "for i in range(40)])\nFINAL(r[0][:4])")
        return repl("r = llm_query_batch(['task %d' % i for i in range(10)])\nprint(r)")

    with FakeLLMServer(subs, scripts={ROOT: [root]}) as srv:
        rlm = make_rlm(srv, max_depth=2, max_tokens=40_000)
        closing.append(rlm)
        result = rlm.completion(context="c", query="q")
    # Ten children would spend ~10 x (40 x 101 + ~1,500) = ~55,000 with budgets of their own.
    assert result.stopped_reason == "budget"
    assert subs.sent < 400
    assert result.total_usage.total_tokens <= 40_000 + 64 * 101 + 10 * 1_600
    children_end = [e for e in result.trajectory if e["type"] == "run_end" and e.get("child_run")]
    assert children_end  # their records are in the parent's log


def test_retries_count_in_the_runs_usage(closing: list[RLM]) -> None:
    refusals = iter([Fault("429", retry_after=0.01)] * 3)

    def sub(messages: list[dict[str, Any]]) -> Any:
        return next(refusals, None) or echo_responder(messages)

    script = [repl("print(llm_query('ECHO ok'))"), repl("FINAL('done')")]
    with FakeLLMServer(sub, scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv, sub_max_retries=5)
        closing.append(rlm)
        result = rlm.completion(context="c", query="q")
    assert result.answer == "done"
    assert result.usage["sub"].retries == 3
    assert rlm.sub_client.usage.retries == 3


def test_cancelling_acompletion_leaves_a_complete_record(tmp_path: Path) -> None:
    slow = repl("print('started')\nrs = llm_query_batch(['ECHO s%d' % i for i in range(100)])")

    async def cancel_mid_batch(srv: FakeLLMServer, rlm: RLM) -> None:
        task = asyncio.create_task(rlm.acompletion(context="c", query="q"))
        assert await asyncio.to_thread(wait_until, lambda: srv.in_flight >= 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with FakeLLMServer(scripts={ROOT: [slow]}, latency=0.3) as srv:
        rlm = make_rlm(srv, max_concurrency=4, log_dir=tmp_path)
        try:
            asyncio.run(cancel_mid_batch(srv, rlm))
            # The cancelled requests are closed on the server's side too.
            assert wait_until(lambda: srv.in_flight == 0)
        finally:
            rlm.client.close_sync()
            rlm.sub_client.close_sync()
    events = read_log(next(tmp_path.glob("*.jsonl")))
    cell = next(e for e in events if e["type"] == "cell_result")
    assert cell["stdout"].startswith("started")
    end = events[-1]
    assert end["type"] == "run_end" and end["stopped_reason"] == "interrupted"
    assert end["sub_calls"] == 100 and end["iterations"] == 1
    assert end["usage"]["root"]["calls"] == 1


def test_closing_the_rlm_during_a_run_returns_an_interrupted_result(closing: list[RLM]) -> None:
    slow = repl("print('started')\nrs = llm_query_batch(['ECHO s%d' % i for i in range(100)])")
    with FakeLLMServer(scripts={ROOT: [slow]}, latency=0.3) as srv:
        rlm = make_rlm(srv, max_concurrency=4)
        closing.append(rlm)
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.append(rlm.completion("c", "q")))
        worker.start()
        assert wait_until(lambda: srv.in_flight >= 4)
        rlm.close()
        worker.join(30)
    result = results[0]
    assert result.stopped_reason == "interrupted"
    assert result.trajectory[-1]["type"] == "run_end"
    assert any(e["type"] == "cell_result" for e in result.trajectory)


def test_closing_a_session_during_an_ask_returns_an_interrupted_result(closing: list[RLM]) -> None:
    slow = repl("print('started')\nrs = llm_query_batch(['ECHO s%d' % i for i in range(100)])")
    with FakeLLMServer(scripts={ROOT: [slow]}, latency=0.3) as srv:
        rlm = make_rlm(srv, max_concurrency=4)
        closing.append(rlm)
        session = rlm.session("c")
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.append(session.ask("q")))
        worker.start()
        assert wait_until(lambda: srv.in_flight >= 4)
        session.close()
        worker.join(30)
    result = results[0]
    assert result.stopped_reason == "interrupted"
    assert result.trajectory[-1]["type"] == "run_end"


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt here, even when the suite was started with SIGINT
    ignored (a shell's background job), where Python never installs that handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_as_default() -> None:
    # In the child, before exec: let the CLI get Ctrl-C even if this suite ignores it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_in_sync_completion_raises_with_the_recorded_result(closing: list[RLM]) -> None:
    slow = repl("print('started')\nrs = llm_query_batch(['ECHO s%d' % i for i in range(100)])")
    with FakeLLMServer(scripts={ROOT: [slow]}, latency=0.3) as srv:
        rlm = make_rlm(srv, max_concurrency=4, max_iterations=2)
        closing.append(rlm)

        def interrupt_when_busy() -> None:
            wait_until(lambda: srv.in_flight >= 4)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

        threading.Thread(target=interrupt_when_busy, daemon=True).start()
        with pytest.raises(RunInterrupted) as caught:
            rlm.completion(context="c", query="q")
    result = caught.value.result
    assert result is not None and result.stopped_reason == "interrupted"
    assert result.iterations == 1 and result.sub_calls == 100
    assert isinstance(caught.value, KeyboardInterrupt)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_rlm_run_interrupted_by_a_signal_writes_run_end_and_exits(
    tmp_path: Path, signum: int, code: int
) -> None:
    slow = repl("print('started')\nrs = llm_query_batch(['ECHO s%d' % i for i in range(200)])")
    context = tmp_path / "ctx.txt"
    context.write_text("some context\n")
    logs = tmp_path / "logs"
    with FakeLLMServer(scripts={ROOT: [slow]}, latency=0.5) as srv:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlm.cli", "run", "--context", str(context), "--query", "q",
             "--model", ROOT, "--recursive-model", SUB, "--base-url", srv.url, "--api-key", "k",
             "--sandbox", "process", "--log-dir", str(logs)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            preexec_fn=_sigint_as_default,  # noqa: PLW1509 - a signal disposition, no threads touched
        )
        try:
            assert wait_until(lambda: srv.in_flight > 5, 60), "the run never reached its batch"
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == code
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err.decode()
    assert lines[0].startswith("rlm: interrupted") and "log: " in lines[0]
    events = read_log(next(logs.glob("*.jsonl")))
    assert any(e["type"] == "cell_result" and e["stdout"].startswith("started") for e in events)
    end = events[-1]
    assert end["type"] == "run_end" and end["stopped_reason"] == "interrupted"
    assert end["sub_calls"] == 200


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_a_storm_of_random_429s_and_503s_leaves_every_item_right(rate: float) -> None:
    # The server runs in its own process (python -m rlm.testing --fault-rate ...), so the
    # 10,000 items are not slowed by sharing one interpreter with it.
    prompts = [f"ECHO {i}" for i in range(10_000)]
    args = ["--fault-rate", str(rate), "--retry-after", "0.01", "--seed", str(int(rate * 100))]
    with spawn_fake_server(extra_args=args) as url:
        client = AsyncOpenAIClient(model="m", api_key="k", base_url=url,
                                   max_concurrency=256, max_retries=40)
        try:
            out = run_sync(client.completion_batch(prompts))
            usage = client.usage
        finally:
            client.close_sync()
        stats = fetch_stats(url)
    assert out == [str(i) for i in range(10_000)]
    assert usage.calls == 10_000 and usage.failed_calls == 0
    assert stats["faults_served"] > 0 and usage.retries == stats["faults_served"]
    assert stats["requests"] == 10_000 + stats["faults_served"]
