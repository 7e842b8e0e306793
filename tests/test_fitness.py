"""Real-model fitness: what the root is told (tools, windows, model override), history
compaction for long runs, and oversized sub-prompts. Scripted roots on FakeLLMServer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rlm_support import ROOT, SUB, make_rlm, repl

from rlm import RLM
from rlm.errors import ConfigError
from rlm.testing import FakeLLMServer, Fault
from rlm.trajectory import read_log


def lookup(customer_id: str, year: int = 2024) -> dict[str, str]:
    """Fetch a customer's record from the CRM by id.

    This second paragraph is detail the root does not need.
    """
    return {"id": customer_id, "year": str(year)}


def no_doc(a, b):  # type: ignore[no-untyped-def]  # deliberately unannotated and undocumented
    return a + b


# -- tools described to the root ------------------------------------------------------


def test_system_prompt_names_each_tool_with_its_signature_and_first_doc_paragraph(
    closing: list[RLM],
) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL(lookup('c1')['id'])")]}) as srv:
        rlm = make_rlm(srv, tools={"lookup": lookup, "add": no_doc})
        closing.append(rlm)
        result = rlm.completion(context="x", query="who?")
        system = srv.requests_log[0]["messages"][0]["content"]
    assert result.answer == "c1"
    assert "`lookup(customer_id: str, year: int = 2024) -> dict[str, str]`" in system
    assert "Fetch a customer's record from the CRM by id." in system
    assert "second paragraph" not in system
    assert "`add(a, b)`" in system  # no docstring: the signature alone


def test_tool_descriptions_override_the_docstring(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        rlm = make_rlm(srv, tools={"lookup": lookup}, tool_descriptions={"lookup": "Use sparingly."})
        closing.append(rlm)
        rlm.completion(context="x", query="q")
        system = srv.requests_log[0]["messages"][0]["content"]
    assert "`lookup(customer_id: str, year: int = 2024) -> dict[str, str]`: Use sparingly." in system
    assert "Fetch a customer's record" not in system


def test_a_description_for_an_unknown_tool_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nope"):
        RLM(model="m", api_key="k", tools={"lookup": lookup}, tool_descriptions={"nope": "x"})


def test_run_start_lists_the_tools(closing: list[RLM], tmp_path: Any) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        rlm = make_rlm(srv, tools={"lookup": lookup, "add": no_doc}, log_dir=tmp_path)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    start = next(e for e in read_log(result.log_path) if e["type"] == "run_start")
    assert start["tools"] == ["add", "lookup"]


def test_system_prompt_states_the_sub_window_and_the_model_override(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        rlm = make_rlm(srv, sub_window_chars=12_345)
        closing.append(rlm)
        rlm.completion(context="x", query="q")
        system = srv.requests_log[0]["messages"][0]["content"]
    assert "12,345 characters" in system
    assert 'model="..."' in system and SUB in system


def test_llm_query_model_keyword_picks_the_model_of_that_call(closing: list[RLM]) -> None:
    code = "a = llm_query('ECHO one', model='other-model')\nb = llm_query_batch(['ECHO two'], model='third')\nFINAL(a + b[0])"
    with FakeLLMServer(scripts={ROOT: [repl(code)]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
        models = sorted(r["model"] for r in srv.requests_log)
    assert result.answer == "onetwo"
    assert models == ["other-model", ROOT, "third"]


# -- oversized sub-prompts -------------------------------------------------------------


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_an_oversized_sub_prompt_gets_a_clear_slot_error_and_is_never_sent(
    closing: list[RLM], sandbox: str
) -> None:
    code = (
        "small = 'ECHO ' + 'a' * 100\n"
        "big = 'ECHO ' + 'b' * 5000\n"
        "out = llm_query_batch([small, big, small])\n"
        "try:\n"
        "    llm_query(big)\n"
        "    single = 'sent'\n"
        "except Exception as e:\n"
        "    single = str(e)\n"
        "FINAL(json.dumps({'out': out, 'single': single}))"
    )
    with FakeLLMServer(scripts={ROOT: [repl("import json\n" + code)]}) as srv:
        rlm = make_rlm(srv, sub_window_chars=1000, sandbox=sandbox)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
        sub_prompts = [r["messages"][-1]["content"] for r in srv.requests_log if r["model"] == SUB]
    data = json.loads(result.answer)
    assert data["out"][0] == data["out"][2] == "a" * 100
    expected = (
        "prompt of 5,005 chars exceeds the sub-model's window of about 1,000 chars; "
        "split it into pieces of at most 1,000 chars"
    )
    assert data["out"][1] == f"[llm_query error: {expected}]"
    assert expected in data["single"]
    # The big one never left; the two identical small ones were one request (single-flight).
    assert sub_prompts == ["ECHO " + "a" * 100]


def test_a_server_context_length_refusal_is_reported_as_the_window_error(closing: list[RLM]) -> None:
    def responder(messages: list[dict[str, Any]]) -> Any:
        if "too long" in messages[-1]["content"]:
            return Fault("context_length")
        return "fine"

    code = "out = llm_query_batch(['too long for the server', 'short'])\nFINAL(out[0] + ' | ' + out[1])"
    with FakeLLMServer(responder, scripts={ROOT: [repl(code)]}) as srv:
        rlm = make_rlm(srv, sub_window_chars=50_000)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert result.answer == (
        "[llm_query error: prompt of 23 chars exceeds the sub-model's window of about 50,000 "
        "chars; split it into pieces of at most 50,000 chars] | fine"
    )


# -- root history compaction -----------------------------------------------------------


def test_a_long_run_is_compacted_and_still_finishes(closing: list[RLM], tmp_path: Any) -> None:
    """Each turn prints 2,000 chars; the window holds about three turns. The root keeps
    a running total in a REPL variable, so the answer is right only if the REPL state
    survived the compaction and the run went on after it."""
    turns = 12
    seen_lengths: list[int] = []

    def root(messages: list[dict[str, Any]]) -> str:
        seen_lengths.append(sum(len(m["content"]) for m in messages))
        last = messages[-1]["content"]
        if "too long to continue" in last:
            return "Summary: counting turns; the REPL variable `total` holds the running sum."
        step = sum(1 for m in messages if m["role"] == "assistant")
        if "total is 12" in last:
            return repl("FINAL_VAR('total')")
        if step == 0:
            return repl("total = 0\nprint('start')")
        return repl("total += 1\nprint('turn-done', 'x' * 2000)\nprint('total is', total)")

    with FakeLLMServer(root) as srv:
        rlm = make_rlm(srv, root_window_tokens=1500, max_iterations=40, log_dir=tmp_path)
        closing.append(rlm)
        result = rlm.completion(context="data", query="count to twelve")
    assert result.answer == "12"
    assert result.stopped_reason == "final"
    events = read_log(result.log_path)
    compactions = [e for e in events if e["type"] == "compaction"]
    assert compactions, "the conversation passed the window but was never compacted"
    assert all(c["tokens_after"] < c["tokens_before"] for c in compactions)
    assert "`total`" in compactions[0]["summary"]
    # The summary calls are root calls: counted in root usage.
    root_turns = sum(1 for e in events if e["type"] == "root_reply")
    assert result.usage["root"].calls == root_turns + len(compactions)
    # No request to the root ever carried much more than the window (1,500 tokens ~ 6,000 chars).
    assert max(seen_lengths) < 6000 + 2 * 2100 + 4000
    assert result.iterations == turns + 2


def test_compaction_is_off_with_none(closing: list[RLM]) -> None:
    script = [repl("print('x' * 3000)")] * 3 + [repl("FINAL('done')")]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv, root_window_tokens=None)
        closing.append(rlm)
        result = rlm.completion(context="x", query="q")
        requests = srv.requests_log
    assert result.answer == "done"
    assert all("too long to continue" not in r["messages"][-1]["content"] for r in requests)


def test_root_window_tokens_is_checked() -> None:
    with pytest.raises(ConfigError, match="root_window_tokens"):
        RLM(model="m", api_key="k", root_window_tokens=10)


def test_system_prompt_lists_what_the_sandbox_can_import(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        rlm = make_rlm(srv)
        closing.append(rlm)
        rlm.completion(context="x", query="q")
        system = srv.requests_log[0]["messages"][0]["content"]
    line = next(s for s in system.split(". ") if "Only these modules can be imported" in s)
    for module in ("asyncio", "csv", "io", "json", "re", "sys"):
        assert f" {module}," in line or line.endswith(f" {module}")
    assert "StringIO" in system


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_replay_of_a_real_model_style_trajectory_reaches_the_right_answer(
    closing: list[RLM], sandbox: str
) -> None:
    """The idioms real roots write, in order: csv over io.StringIO, asyncio.gather over
    llm_query_async, and FINAL_VAR given the value rather than its name."""
    rows = ["region,amount"] + [f"{r},{a}" for r, a in
                                [("north", 10), ("south", 5), ("north", 7), ("east", 1), ("south", 2)]]
    blocks = [
        repl("print(type(context), len(context))\nprint(context[:40])", "Let me look at the data."),
        repl(
            "import csv, io, sys\ncsv.field_size_limit(sys.maxsize)\n"
            "rows = list(csv.DictReader(io.StringIO(context)))\n"
            "by_region = {}\nfor r in rows:\n"
            "    by_region.setdefault(r['region'], []).append(int(r['amount']))\n"
            "print(len(rows), sorted(by_region))",
            "Parse the CSV.",
        ),
        repl(
            "import asyncio\nregions = sorted(by_region)\n"
            "replies = await asyncio.gather(*[llm_query_async(f'ECHO {sum(by_region[k])}') for k in regions])\n"
            "totals = dict(zip(regions, map(int, replies)))\nprint(totals)",
            "Ask a sub-model per region, concurrently.",
        ),
        repl("answer_value = max(totals, key=totals.get)\nFINAL_VAR(answer_value)", "Done."),
    ]
    with FakeLLMServer(scripts={ROOT: blocks}) as srv:
        rlm = make_rlm(srv, sandbox=sandbox)
        closing.append(rlm)
        result = rlm.completion(context="\n".join(rows) + "\n", query="Which region has the largest total?")
    assert result.answer == "north"
    assert result.stopped_reason == "final"
    assert result.iterations == 4
    assert result.sub_calls == 3
    assert all(e.get("error") is None for e in result.trajectory if e["type"] == "cell_result")


def test_a_confined_process_sandbox_tells_the_root_about_files_and_data_libraries(
    closing: list[RLM],
) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        rlm = make_rlm(srv, sandbox="process")
        closing.append(rlm)
        rlm.completion(context="x", query="q")
        system = srv.requests_log[0]["messages"][0]["content"]
    from rlm import REPLEnv

    with REPLEnv(context="x", sandbox="process") as env:
        protections = env.protections
    if protections["file_access"]:
        assert "`open()` works for scratch files" in system
        for module in protections["data_modules"].split(", "):
            assert f" {module}" in system
    else:
        assert "There is no file, network or OS access." in system
