"""The RLM root loop, with scripted root and sub models on FakeLLMServer."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from rlm_support import ROOT, SUB, last_user, make_rlm, repl

from rlm import RLM, RLMResult
from rlm import demo as demo_task
from rlm.errors import ConfigError
from rlm.testing import FakeLLMServer, Fault
from rlm.trajectory import read_log


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_needle_in_a_million_lines_through_batched_sub_queries(sandbox: str) -> None:
    haystack = demo_task.build_haystack(1_000_000)
    with demo_task.demo_server(latency=1.0) as srv:
        rlm = RLM(model=demo_task.ROOT_MODEL, recursive_model=demo_task.SUB_MODEL, base_url=srv.url,
                  api_key="k", max_concurrency=64, sandbox=sandbox)
        result = rlm.completion(context=haystack.text, query=demo_task.QUERY)
        rlm.close()
        peak = srv.peak_in_flight
    assert result.answer == haystack.needle
    assert result.stopped_reason == "final"
    assert result.sub_calls == 100  # 1,000,000 lines in chunks of 10,000
    # Concurrent, and capped by the sub client's limit. Exactly 64 needs all 64 of the 475 KB
    # prompts serialised within one latency, which a loaded machine does not always manage.
    assert 32 <= peak <= 64
    assert result.usage["root"].calls == 3
    assert result.usage["sub"].calls == 100


def test_the_root_never_sees_the_context(closing: list[RLM]) -> None:
    secret = "ZEBRA-" * 5
    context = "filler line\n" * 5000 + secret
    with FakeLLMServer(scripts={ROOT: [repl("FINAL(str(len(context)))")]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = rlm.completion(context=context, query="how long?")
        sent = json.dumps(srv.requests_log)
    assert result.answer == str(len(context))
    assert secret not in sent
    assert "str" in sent and f"{len(context):,}" in sent  # the description: type and size


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_aggregation_over_10000_records_is_exact(closing: list[RLM], sandbox: str) -> None:
    records = [{"id": i, "text": ("great product" if i % 3 == 0 else "bad service" if i % 3 == 1 else "okay")}
               for i in range(10_000)]
    expected = {"positive": 3334, "negative": 3333, "neutral": 3333}

    def sub(messages: list[dict[str, Any]]) -> str:
        labels = []
        for text in re.findall(r"^\d+: (.*)$", last_user(messages), re.MULTILINE):
            labels.append("positive" if "great" in text else "negative" if "bad" in text else "neutral")
        return json.dumps(labels)

    script = [
        repl("print(len(context), context[0])"),
        repl(
            "import json\nfrom collections import Counter\n"
            "chunks = [context[i:i + 100] for i in range(0, len(context), 100)]\n"
            "prompts = ['Label each line positive/negative/neutral as a JSON list.\\n' + "
            "'\\n'.join(f\"{r['id']}: {r['text']}\" for r in c) for c in chunks]\n"
            "labels = llm_query_batch(prompts)\n"
            "counts = Counter()\n"
            "for reply in labels:\n    for label in json.loads(reply):\n        counts[label] += 1\n"
            "print(dict(counts))"
        ),
        repl("FINAL(json.dumps(dict(sorted(counts.items()))))"),
    ]
    with FakeLLMServer(sub, scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv, sandbox=sandbox)
        closing.append(rlm)
        result = rlm.completion(context=records, query="How many records of each label?")
    assert json.loads(result.answer or "{}") == expected
    assert result.sub_calls == 100


def test_an_error_in_a_cell_is_fed_back_and_fixed(closing: list[RLM]) -> None:
    def second_turn(messages: list[dict[str, Any]]) -> str:
        feedback = last_user(messages)
        assert "NameError" in feedback and "undefined_name" in feedback
        return repl("value = 41 + 1\nFINAL(str(value))", "Fixing the name error.")

    script = [repl("print(undefined_name)"), second_turn]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert result.answer == "42"
    assert result.iterations == 2
    errors = [e for e in result.trajectory if e["type"] == "cell_result" and e["error"]]
    assert len(errors) == 1 and "NameError" in errors[0]["error"]


def test_final_var_of_a_missing_name_is_an_error_the_root_can_fix(closing: list[RLM]) -> None:
    def second_turn(messages: list[dict[str, Any]]) -> str:
        assert "nothing_here" in last_user(messages)
        return repl("nothing_here = 'found it'\nFINAL_VAR('nothing_here')")

    with FakeLLMServer(scripts={ROOT: [repl("FINAL_VAR('nothing_here')"), second_turn]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert result.answer == "found it"
    first_error = next(e for e in result.trajectory if e["type"] == "cell_result")["error"]
    assert "nothing_here" in first_error


def test_final_written_in_plain_text_is_accepted(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: ["I know this one.\nFINAL(plain answer)"]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert result.answer == "plain answer"
    assert result.stopped_reason == "final"


def test_max_iterations_ends_with_a_final_answer_turn(closing: list[RLM]) -> None:
    def root(messages: list[dict[str, Any]]) -> str:
        if "used all your iterations" in last_user(messages):
            return "FINAL(best guess)"
        return repl("print('still looking')")

    with FakeLLMServer(root) as srv:
        rlm = make_rlm(srv, max_iterations=3)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert result.answer == "best guess"
    assert result.stopped_reason == "max_iterations"
    assert result.iterations == 3
    assert result.usage["root"].calls == 4


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        ({"max_cost_usd": 0.001, "prices": {ROOT: (1000.0, 1000.0), SUB: (1.0, 1.0)}}, "max_cost_usd"),
        ({"max_tokens": 50}, "max_tokens"),
        ({"max_time_s": 0.3}, "max_time_s"),
    ],
)
def test_each_budget_stops_a_run(closing: list[RLM], budget: dict[str, Any], reason: str) -> None:
    with FakeLLMServer(lambda m: repl("print('working')"), latency=0.2) as srv:
        rlm = make_rlm(srv, max_iterations=50, **budget)
        closing.append(rlm)
        result = rlm.completion(context="some context " * 50, query="q")
    assert result.stopped_reason == "budget"
    assert result.answer is None
    assert reason in (result.error or "")
    assert result.iterations < 50


def test_depth_two_runs_a_child_rlm_for_each_sub_query(closing: list[RLM]) -> None:
    def root(messages: list[dict[str, Any]]) -> str:
        if "Carry out the request" in messages[1]["content"]:
            # a child run: its context is the parent's prompt
            return repl("FINAL('child saw: ' + context[:12])")
        if not any(m["role"] == "assistant" for m in messages):
            return repl("r = llm_query_batch(['question one', 'question two'])\nprint(r)")
        return repl("FINAL(' | '.join(r))")

    with FakeLLMServer(scripts={ROOT: [root]}) as srv:
        rlm = make_rlm(srv, max_depth=2)
        closing.append(rlm)
        result = rlm.completion(context="parent context", query="ask the children")
        sub_requests = [r for r in srv.requests_log if r["model"] == SUB]
    assert result.answer == "child saw: question one | child saw: question two"
    assert sub_requests == []  # at depth 2 llm_query is a child RLM, not a plain call
    children = {e["child_run"] for e in result.trajectory if "child_run" in e}
    assert len(children) == 2
    assert result.usage["sub"].calls == 2  # the children's root turns count as sub-work


async def test_fifty_tasks_at_once_with_two_failing(closing: list[RLM]) -> None:
    def root(messages: list[dict[str, Any]]) -> str | Fault:
        query = messages[1]["content"]
        if "task 7 " in query or "task 33 " in query:
            return Fault("500")
        n = re.search(r"task (\d+) ", query).group(1)  # type: ignore[union-attr]
        return repl(f"FINAL(str({n} * 2) + ' ' + llm_query('ECHO ok'))")

    # root requests start with the system prompt; llm_query('ECHO ok') is a bare user message
    with FakeLLMServer(lambda m: root(m) if m[0]["role"] == "system" else "ok") as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        tasks = [(f"context {i}", f"task {i} please") for i in range(50)]
        results = await rlm.acompletion_batch(tasks, max_concurrency=10, progress=False)
    assert len(results) == 50
    failed = [i for i, r in enumerate(results) if r.error]
    assert failed == [7, 33]
    assert all(isinstance(r, RLMResult) for r in results)
    assert results[7].stopped_reason == "error" and "500" in (results[7].error or "")
    assert [r.answer for i, r in enumerate(results) if i not in failed] == [
        f"{i * 2} ok" for i in range(50) if i not in failed
    ]


def test_session_keeps_repl_state_across_asks(closing: list[RLM]) -> None:
    def root(messages: list[dict[str, Any]]) -> str:
        query = messages[1]["content"]
        if "Query: first question" in query:
            return repl("total = len(context)\nFINAL(str(total))")
        assert "Q: first question" in query and "A: 6" in query  # the history is told
        return repl("FINAL(str(total * 2))")

    with FakeLLMServer(scripts={ROOT: [root]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        with rlm.session("abcdef") as session:
            first = session.ask("first question")
            second = session.ask("second question")
    assert (first.answer, second.answer) == ("6", "12")


async def test_sync_completion_inside_a_running_loop(closing: list[RLM]) -> None:
    assert asyncio.get_running_loop().is_running()
    with FakeLLMServer(scripts={ROOT: [repl("FINAL(llm_query('ECHO inner'))")]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")  # sync, from inside a loop
    assert result.answer == "inner"


async def test_acompletion_from_the_callers_loop(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("x = await llm_query_batch_async(['ECHO a', 'ECHO b'])\nFINAL(''.join(x))")]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = await rlm.acompletion(context="x", query="q")
    assert result.answer == "ab"
    assert result.sub_calls == 2


def test_trajectory_log_is_written_as_it_happens(tmp_path: Path, closing: list[RLM]) -> None:
    script = [repl("print('one')"), repl("FINAL('done')")]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv, log_dir=tmp_path)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert result.log_path is not None
    events = read_log(result.log_path)
    types = [e["type"] for e in events]
    assert types[0] == "run_start" and types[-1] == "run_end"
    assert types.count("root_reply") == 2 and types.count("cell_result") == 2
    assert events[-1]["answer"] == "done"
    assert [e["type"] for e in result.trajectory] == types


def test_the_default_sandbox_is_the_worker_process_on_linux() -> None:
    assert RLM(api_key="k").sandbox == "process"


def test_bad_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_iterations"):
        RLM(api_key="k", max_iterations=0)
    with pytest.raises(ConfigError, match="sandbox"):
        RLM(api_key="k", sandbox="docker")
    with pytest.raises(ConfigError, match="query"):
        RLM(api_key="k").completion(context="x", query="")


def test_a_missing_key_fails_at_construction_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        RLM(model="m")


async def test_one_bad_task_fails_alone_in_a_batch(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('done')")] * 2}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        results = await rlm.acompletion_batch([("ctx", "fine"), ("ctx", ""), {"context": "x"}],
                                              progress=False)
    assert results[0].answer == "done"
    for bad in results[1:]:
        assert bad.answer is None and bad.stopped_reason == "error"
        assert "query must be a non-empty str" in (bad.error or "")


async def test_max_concurrent_is_a_deprecated_alias_of_max_concurrency(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        with pytest.warns(DeprecationWarning, match="max_concurrency"):
            results = await rlm.acompletion_batch([("c", "q")], max_concurrent=2, progress=False)
    assert results[0].answer == "ok"


def test_sub_query_prompts_and_replies_are_in_the_log(closing: list[RLM], tmp_path: Path) -> None:
    code = "r = llm_query_batch(['ECHO ' + 'a' * 5000, 'ECHO short'])\nFINAL(str(len(r)))"
    with FakeLLMServer(scripts={ROOT: [repl(code)] * 2}) as srv:
        capped = make_rlm(srv, log_dir=tmp_path / "capped")
        full = make_rlm(srv, log_dir=tmp_path / "full", record_subcalls="full")
        closing.extend([capped, full])
        capped_result = capped.completion(context="x", query="q")
        full_result = full.completion(context="x", query="q")
    (event,) = [e for e in read_log(capped_result.log_path) if e["type"] == "sub_queries"]
    long_call, short_call = event["calls"]
    assert short_call == {"prompt": "ECHO short", "reply": "short"}
    assert long_call["prompt"].startswith("ECHO aaa") and "characters omitted" in long_call["prompt"]
    assert len(long_call["prompt"]) < 2_100
    (event,) = [e for e in read_log(full_result.log_path) if e["type"] == "sub_queries"]
    assert event["calls"][0]["prompt"] == "ECHO " + "a" * 5000


def test_record_subcalls_none_keeps_only_counts_and_timings(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL(llm_query('ECHO hi'))")]}) as srv:
        rlm = make_rlm(srv, record_subcalls="none")
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert result.answer == "hi" and result.sub_calls == 1
    [event] = [e for e in result.trajectory if e["type"] == "sub_queries"]
    assert "calls" not in event and "hi" not in json.dumps(event)
    assert event["n"] == 1 and len(event["timing"]["ms"]) == 1


def test_result_repr_shows_the_answer_and_key_numbers(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('short answer')")]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        text = repr(rlm.completion(context="x", query="q"))
    assert "short answer" in text and "iterations=1" in text and "stopped_reason='final'" in text


def test_a_run_killed_mid_way_leaves_a_complete_log(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    # Turn 1 runs a cell; turn 2's root request never gets an answer; then the run is killed.
    with FakeLLMServer(scripts={ROOT: [repl("print('first cell ran')"), Fault("hang")]}) as srv:
        script = (
            "from rlm import RLM\n"
            f"RLM(model={ROOT!r}, base_url={srv.url!r}, api_key='k', sandbox='local', "
            f"log_dir={str(tmp_path)!r}).completion(context='x', query='q')\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script])
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                logs = list(tmp_path.glob("rlm-*.jsonl"))
                if logs and '"iteration": 2' in logs[0].read_text():
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    lines = logs[0].read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is whole JSON
    types = [e["type"] for e in events]
    assert types == ["run_start", "root_request", "root_reply", "cell", "cell_result", "root_request"]
    assert events[4]["stdout"] == "first cell ran\n"
    assert read_log(logs[0]) == events


def test_verbose_shows_each_iteration_live(capsys: pytest.CaptureFixture[str], closing: list[RLM]) -> None:
    script = [repl("parts = llm_query_batch(['ECHO x', 'ECHO y'])\nprint('got', parts)"),
              repl("FINAL('shown')")]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv, verbose=True)
        closing.append(rlm)
        rlm.completion(context="x", query="q")
    out = capsys.readouterr().out
    assert "iteration 1" in out and "iteration 2" in out
    assert "llm_query_batch" in out  # the code
    assert "got ['x', 'y']" in out  # the output
    assert "sub-queries 2/2" in out  # batch progress
    assert "shown" in out  # the final answer


def test_a_failed_sub_query_is_an_error_string_in_its_slot(closing: list[RLM]) -> None:
    def responder(messages: list[dict[str, Any]]) -> str | Fault:
        return Fault("500") if last_user(messages) == "ECHO bad" else last_user(messages)[5:]

    script = [repl("r = llm_query_batch(['ECHO ok', 'ECHO bad'])\nprint(r)"), repl("FINAL(r[1][:17])")]
    with FakeLLMServer(responder, scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    cell = next(e for e in result.trajectory if e["type"] == "cell_result")
    assert "'ok', '[llm_query error: server error 500" in cell["stdout"]
    assert "1 of 2" in cell["stderr"]
    assert result.answer == "[llm_query error:"


@pytest.mark.timeout(120)
def test_many_process_sandbox_runs_started_on_the_engine_loop_all_finish() -> None:
    """Each run parks a default-executor thread while its worker starts; the start itself
    must not need one of those threads, or 16 runs at once would wait on each other forever."""
    from rlm import loop as engine

    with FakeLLMServer(scripts={ROOT: [repl("FINAL(str(len(context)))")]}) as srv:
        rlm = RLM(model=ROOT, recursive_model=SUB, base_url=srv.url, api_key="k", sandbox="process")
        try:
            results = engine.run_sync(
                rlm.acompletion_batch([("x" * i, "q") for i in range(1, 17)], max_concurrency=16,
                                      progress=False)
            )
        finally:
            rlm.close()
    assert [r.answer for r in results] == [str(i) for i in range(1, 17)]
