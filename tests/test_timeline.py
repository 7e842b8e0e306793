"""The HTML page's timeline and the sub-call timing it is drawn from: root turns, cells
and sub-queries in flight, light for a 10,000-sub-query run, opened in headless Chromium.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from browser_support import dump_dom, screenshot
from rlm_support import ROOT, make_rlm, repl

from rlm import RLM
from rlm import demo as demo_task
from rlm.display import trajectory_html
from rlm.display.timeline import COLUMNS, timeline_from_events, timeline_svg
from rlm.llm import LARGE_BATCH
from rlm.subqueries import TIMED_ITEMS
from rlm.testing import FakeLLMServer
from rlm.trajectory import read_log, read_sub_calls


def sub_query_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "sub_queries"]


def test_each_sub_call_is_timed_in_the_trajectory(closing: list[RLM]) -> None:
    code = "r = llm_query_batch(['ECHO a', 'ECHO bb', 'ECHO ccc'])\nFINAL(llm_query('ECHO d'))"
    with FakeLLMServer(scripts={ROOT: [repl(code)]}, latency=0.05) as srv:
        result = make_rlm(srv, closing).completion(context="x", query="q")
    batch, single = sub_query_events(result.trajectory)
    cell = next(e for e in result.trajectory if e["type"] == "cell")
    assert cell["t"] <= batch["t0"] <= single["t0"] and batch["n"] == 3 and single["n"] == 1
    calls = read_sub_calls(batch)
    assert [c.index for c in calls.items] == [0, 1, 2] and calls.tail_ends == []
    assert all(0.05 <= c.end - c.start <= batch["t"] - batch["t0"] + 0.001 for c in calls.items)
    timed = calls.items + read_sub_calls(single).items
    sub = result.usage["sub"]
    assert sum(c.tokens_in for c in timed) == sub.prompt_tokens
    assert sum(c.tokens_out for c in timed) == sub.completion_tokens
    assert {c.model for c in timed} == {"sub-model"}


def test_a_large_batch_keeps_its_tail_compact(closing: list[RLM]) -> None:
    code = "r = llm_query_batch([f'ECHO {i}' for i in range(900)])\nFINAL(str(len(r)))"
    with FakeLLMServer(scripts={ROOT: [repl(code)]}) as srv:
        result = make_rlm(srv, closing, max_concurrency=128).completion(context="x", query="q")
    [event] = sub_query_events(result.trajectory)
    calls = read_sub_calls(event)
    assert len(calls.items) == TIMED_ITEMS and len(calls.tail_ends) == 900 - TIMED_ITEMS
    assert calls.tail_ends == sorted(calls.tail_ends)
    assert len(json.dumps(event["timing"])) < 16 * 900  # bytes per sub-query, all told
    sub = result.usage["sub"]
    [(model, tail)] = calls.tail_models.items()
    assert model == "sub-model" and tail["calls"] == 900 - TIMED_ITEMS
    assert sum(c.tokens_in for c in calls.items) + tail["in"] == sub.prompt_tokens


def test_a_cell_times_its_first_sub_calls_however_its_batches_are_cut(closing: list[RLM]) -> None:
    # 2,000 prompts reach the service in slices of 256, and two more batches follow.
    code = ("a = llm_query_batch([f'ECHO {i}' for i in range(2000)])\n"
            "b = llm_query_batch(['ECHO x', 'ECHO y'])\nFINAL(str(len(a) + len(b)))")
    with FakeLLMServer(scripts={ROOT: [repl(code), repl("FINAL(str(len(llm_query_batch(['ECHO z']))))")]}) as srv:
        result = make_rlm(srv, closing).completion(context="x", query="q")
    assert result.answer == "2002"
    events = sub_query_events(result.trajectory)
    assert len(events) > 3 and sum(e["n"] for e in events) == 2002
    timed = [len(read_sub_calls(e).items) for e in events]
    assert sum(timed) == TIMED_ITEMS and timed[-1] == 0  # the second batch came after the first 100


def test_a_batch_just_past_the_clients_large_batch_size_stays_whole(closing: list[RLM]) -> None:
    # Timing 100 one by one would leave the client's batch under LARGE_BATCH, where it
    # no longer holds full garbage collections back: a third more CPU.
    code = f"r = llm_query_batch([f'ECHO {{i}}' for i in range({LARGE_BATCH + 10})])\nFINAL(str(len(r)))"
    with FakeLLMServer(scripts={ROOT: [repl(code)]}) as srv:
        result = make_rlm(srv, closing, max_concurrency=128).completion(context="x", query="q")
    [event] = sub_query_events(result.trajectory)
    calls = read_sub_calls(event)
    assert len(calls.items) == 10 and len(calls.tail_ends) == LARGE_BATCH


def test_a_childs_sub_calls_are_timed_on_the_parents_clock(closing: list[RLM]) -> None:
    def root(messages: list[dict[str, Any]]) -> str:
        if "Carry out the request" in messages[1]["content"]:
            return repl("FINAL(llm_query('ECHO ' + context))")
        return repl("r = llm_query_batch(['one', 'two'])\nFINAL(' '.join(r))")

    with FakeLLMServer(scripts={ROOT: [root]}, latency=0.02) as srv:
        result = make_rlm(srv, closing, max_depth=2).completion(context="x", query="q")
    assert result.answer == "one two"
    events = result.trajectory
    for child in {e["child_run"] for e in events if "child_run" in e}:
        mine = [e for e in events if e.get("child_run") == child]
        start = next(e["t"] for e in mine if e["type"] == "run_start")
        [event] = sub_query_events(mine)
        assert start <= event["t0"] <= event["t"]
    [parent] = [e for e in sub_query_events(events) if "child_run" not in e]
    assert parent["child"] is True and len(parent["timing"]["ms"]) == 2


def test_an_oversized_prompt_is_timed_as_failed_at_once(closing: list[RLM]) -> None:
    code = "r = llm_query_batch(['ECHO a', 'x' * 500, 'ECHO c'])\nFINAL(r[0] + r[2])"
    with FakeLLMServer(scripts={ROOT: [repl(code)]}, latency=0.02) as srv:
        result = make_rlm(srv, closing, sub_window_chars=100).completion(context="x", query="q")
    assert result.answer == "ac"
    calls = read_sub_calls(sub_query_events(result.trajectory)[0])
    assert [(c.index, c.error, c.end - c.start) for c in calls.items if c.error] == [(1, "LLMError", 0.0)]
    assert [c.index for c in calls.items if not c.error] == [0, 2]


def test_the_timeline_shows_turns_cells_and_the_sub_queries_in_flight(closing: list[RLM]) -> None:
    script = [repl("r = llm_query_batch([f'ECHO {i}' for i in range(30)])"), repl("FINAL(llm_query('ECHO z'))")]
    with FakeLLMServer(scripts={ROOT: script}, latency=0.05) as srv:
        result = make_rlm(srv, closing).completion(context="x", query="q")
    line = timeline_from_events(result.trajectory)
    assert len(line.turns) == 2 and len(line.cells) == 2
    assert line.sub_queries == 31 and line.peak == 30
    assert len(line.in_flight) == COLUMNS and line.in_flight.count(0) > COLUMNS // 4  # idle while the root thinks


def test_a_log_without_sub_call_timing_still_draws() -> None:
    # As runs wrote it before sub-calls were timed: no t0, no timing.
    run = {"run_id": "r", "depth": 0}
    events = [
        {"type": "run_start", "t": 0.0, **run},
        {"type": "root_request", "t": 0.1, "iteration": 1, **run},
        {"type": "root_reply", "t": 1.0, "iteration": 1, **run},
        {"type": "cell", "t": 1.0, "iteration": 1, "index": 0, **run},
        {"type": "sub_queries", "t": 3.0, "iteration": 1, "calls": [{"prompt": "a", "reply": "b"}] * 3, **run},
        {"type": "cell_result", "t": 3.1, "iteration": 1, "index": 0, **run},
        {"type": "run_end", "t": 3.2, **run},
    ]
    line = timeline_from_events(events)
    assert line.sub_queries == 3 and line.peak == 3  # during their cell
    assert line.in_flight[0] == 0 and line.in_flight[COLUMNS // 2] == 3


def test_the_timeline_holds_no_script_and_escapes_what_it_shows(closing: list[RLM], tmp_path: Path) -> None:
    script = [repl("print(llm_query('ECHO <script>alert(1)</script>'))"), repl("FINAL('</svg><script>x()</script>')")]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        result = make_rlm(srv, closing).completion(context="x", query="<script>alert(2)</script>")
    svg = timeline_svg(result.trajectory)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<script" not in svg and "alert" not in svg
    page = trajectory_html(result.trajectory)
    assert page.count("<script") == 1  # the filter box's own, as before
    assert not re.search(r"\b(src|href)\s*=", page, re.IGNORECASE)


def _page_in_chromium(events: list[dict[str, Any]], tmp_path: Path) -> str:
    page = tmp_path / "run.html"
    page.write_text(trajectory_html(events), encoding="utf-8")
    dom = dump_dom(page)
    shot = screenshot(page, tmp_path / "run.png")
    assert shot.stat().st_size > 10_000  # something was drawn
    return dom


def _svg_of(dom: str) -> str:
    match = re.search(r'<div id="rlm-timeline">(<svg.*?</svg>)</div>', dom, re.DOTALL)
    assert match is not None, "no timeline in the page Chromium loaded"
    return match.group(1)


def test_the_timeline_renders_in_chromium_for_a_demo_run(tmp_path: Path) -> None:
    haystack = demo_task.build_haystack(100_000)
    with demo_task.demo_server(latency=0.05) as srv:
        rlm = RLM(model=demo_task.ROOT_MODEL, recursive_model=demo_task.SUB_MODEL, base_url=srv.url,
                  api_key="k", sandbox="local", log_dir=tmp_path)
        result = rlm.completion(context=haystack.text, query=demo_task.QUERY)
        rlm.close()
    assert result.answer == haystack.needle
    svg = _svg_of(_page_in_chromium(read_log(result.log_path), tmp_path))
    for label in ("root turn 1", "root turn 3", "iteration 2, cell 1", "up to 10 sub-queries in flight"):
        assert label in svg
    assert svg.count("<rect") <= COLUMNS + 3 + 3


@pytest.mark.timeout(900)  # 10,000 requests with the server in this process, on a loaded machine
def test_the_timeline_of_a_10000_sub_query_run_stays_light(closing: list[RLM], tmp_path: Path) -> None:
    code = "r = llm_query_batch([f'ECHO {i}' for i in range(10_000)])\nFINAL(str(len(r)))"
    with FakeLLMServer(scripts={ROOT: [repl(code)]}) as srv:
        # Without the 10,000 prompts and replies, the page is the timeline's test alone.
        result = make_rlm(srv, closing, max_concurrency=256, log_dir=tmp_path,
                          record_subcalls="none").completion(context="x", query="q")
    assert result.answer == "10000"
    events = read_log(result.log_path)
    svg = _svg_of(_page_in_chromium(events, tmp_path))
    assert svg.count("<rect") <= COLUMNS + 1 + 1  # columns' tooltips, one turn, one cell
    assert len(svg) < 60_000
    line = timeline_from_events(events)
    assert line.sub_queries == 10_000
    # The REPL hands the host at most 1,024 of them at a time (max_in_flight).
    assert 256 <= line.peak <= 1024 and f"up to {line.peak:,} sub-queries in flight" in svg


def test_rlm_view_otlp_writes_the_spans_of_a_log(closing: list[RLM], tmp_path: Path) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL(llm_query('ECHO ok'))")]}) as srv:
        result = make_rlm(srv, closing, log_dir=tmp_path).completion(context="x", query="q")
    out = tmp_path / "trace.json"
    proc = subprocess.run([sys.executable, "-m", "rlm", "view", result.log_path, "--otlp", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out} (4 spans, OTLP JSON)"
    spans = json.loads(out.read_text())["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert sorted(s["name"] for s in spans) == [
        "chat root-model", "chat sub-model", "execute_tool repl", "invoke_agent rlm",
    ]


def test_rlm_view_otlp_to_a_path_it_cannot_write_is_one_line(closing: list[RLM], tmp_path: Path) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        result = make_rlm(srv, closing, log_dir=tmp_path).completion(context="x", query="q")
    proc = subprocess.run([sys.executable, "-m", "rlm", "view", result.log_path, "--otlp",
                           str(tmp_path / "missing" / "trace.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--otlp" in proc.stderr
