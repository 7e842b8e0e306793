"""Typed answers: RLM runs with schema=, validated in the host, fed back and retried."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from rlm_support import ROOT, Counted, Totals, last_user, make_rlm, repl

from rlm import RLM
from rlm.errors import ConfigError
from rlm.testing import FakeLLMServer


def test_a_wrong_final_is_told_its_error_and_the_fixed_one_is_the_output(closing: list[RLM]) -> None:
    def second(messages: list[dict[str, Any]]) -> str:
        feedback = last_user(messages)
        assert "$.count: expected a valid integer" in feedback and "'many'" in feedback
        return repl('FINAL({"count": 3, "ids": ["a", "b", "c"]})', "Fixing the count.")

    script = [repl('FINAL({"count": "many", "ids": ["a", "b", "c"]})'), second]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        result = make_rlm(srv, closing).completion("a b c", "How many ids?", schema=Counted)
        system = srv.requests_log[0]["messages"][0]["content"]
    assert result.output == Counted(count=3, ids=["a", "b", "c"])
    assert result.iterations == 2
    assert result.stopped_reason == "final" and result.ok
    assert json.loads(result.answer or "") == {"count": 3, "ids": ["a", "b", "c"]}
    # The root was shown the shape as a JSON Schema.
    assert '"count"' in system and '"integer"' in system and "FINAL" in system
    invalid = [e for e in result.trajectory if e["type"] == "answer_invalid"]
    assert invalid[0]["errors"][0]["path"] == "$.count"
    told = [e for e in result.trajectory if e["type"] == "root_request" and e["iteration"] == 2]
    assert "does not match the required JSON Schema" in told[0]["messages"][0]["content"]
    assert result.to_dict()["output"] == {"count": 3, "ids": ["a", "b", "c"]}


def test_retries_running_out_ends_with_invalid_answer_keeping_the_raw_value(closing: list[RLM]) -> None:
    script = [repl('FINAL({"count": "many", "ids": []})')]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv, closing, max_answer_retries=1)
        result = rlm.completion("x", "How many?", schema=Counted)
    assert result.stopped_reason == "invalid_answer"
    assert result.iterations == 2  # the first answer and one retry
    assert result.answer is None and result.output is None and not result.ok
    assert result.raw_output in ({"count": "many", "ids": []}, "{'count': 'many', 'ids': []}")
    assert result.validation_errors[0]["path"] == "$.count"
    assert "did not match the schema" in (result.error or "")
    data = result.to_dict()
    assert data["stopped_reason"] == "invalid_answer" and data["validation_errors"]


@pytest.mark.parametrize(
    ("schema", "final", "expected"),
    [
        (list[str], 'FINAL(["a", "b"])', ["a", "b"]),
        (Totals, 'FINAL({"total": 12, "currency": "EUR"})', {"total": 12, "currency": "EUR"}),
        (
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            'FINAL({"n": 5})',
            {"n": 5},
        ),
        (int, "FINAL(7)", 7),
    ],
    ids=["list[str]", "TypedDict", "json-schema-dict", "int"],
)
def test_each_kind_of_schema_gives_its_output(closing: list[RLM], schema: Any, final: str, expected: Any) -> None:
    with FakeLLMServer(scripts={ROOT: [repl(final)]}) as srv:
        result = make_rlm(srv, closing).completion("ctx", "What is it?", schema=schema)
    assert result.stopped_reason == "final"
    assert result.output == expected
    assert json.loads(result.answer or "") == expected


def test_an_answer_written_in_prose_is_parsed_and_validated(closing: list[RLM]) -> None:
    script = ['Done.\nFINAL({"count": 1, "ids": ["z"]})']
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        result = make_rlm(srv, closing).completion("ctx", "How many?", schema=Counted)
    assert result.output == Counted(count=1, ids=["z"])


async def test_a_schema_for_every_task_of_a_batch_and_one_task_of_its_own(closing: list[RLM]) -> None:
    def root(messages: list[dict[str, Any]]) -> str:
        query = messages[1]["content"]
        return repl("FINAL(['x'])" if "list" in query else "FINAL(len(context))")

    with FakeLLMServer(root) as srv:
        results = await make_rlm(srv, closing).acompletion_batch(
            [("abc", "the length"), {"context": "q", "query": "a list", "schema": list[str]}],
            progress=False,
            schema=int,
        )
    assert [r.output for r in results] == [3, ["x"]]


def test_a_session_ask_takes_a_schema(closing: list[RLM]) -> None:
    script = [repl("FINAL(len(context))")]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        rlm = make_rlm(srv, closing)
        with rlm.session("hello") as session:
            result = session.ask("How long?", schema=int)
    assert result.output == 5 and result.answer == "5"


def test_something_that_is_not_a_schema_is_refused_before_any_request(closing: list[RLM]) -> None:
    with FakeLLMServer() as srv:
        rlm = make_rlm(srv, closing)
        with pytest.raises(ConfigError, match="schema must be"):
            rlm.completion("x", "q", schema="list of str")
        assert srv.requests == 0


def test_a_refused_answer_shows_in_the_live_view_and_the_html_page(closing: list[RLM]) -> None:
    import io

    from rich.console import Console

    from rlm.display import LiveDisplay, trajectory_html

    script = [repl('FINAL({"count": "many", "ids": []})'), repl('FINAL({"count": 0, "ids": []})')]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        result = make_rlm(srv, closing).completion("x", "How many?", schema=Counted)
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    live = LiveDisplay(console=console)
    for event in result.trajectory:
        live(event)
    shown = console.file.getvalue()
    refused = "answer refused by the schema: $.count: expected a valid integer"
    assert refused in shown
    assert refused in trajectory_html(result.trajectory)


FINAL_OBJECTS = """
class Point:
    def __init__(self, x):
        self.x = x
class Loud(str):
    def upper(self):
        return "hijacked"
    def strip(self, *args):
        return "hijacked"
class Counts(dict):
    def items(self):
        return [("hijacked", 1)]
"""


@pytest.mark.parametrize("sandbox", ["local", "process"])
@pytest.mark.parametrize(
    ("final", "expected"),
    [
        ("FINAL(Point(3))", re.compile(r"<\S*Point object at 0x[0-9a-f]+>")),
        ("FINAL(Loud('plain text'))", "plain text"),
        ("FINAL(Counts(a=1, b=[Loud('x'), (2, 3.5)]))", {"a": 1, "b": ["x", [2, 3.5]]}),
        ("FINAL([1, True, None, {'k': 'v'}])", [1, True, None, {"k": "v"}]),
        ("value = Counts(n=2)\nFINAL_VAR('value')", {"n": 2}),
    ],
    ids=["user-object", "str-subclass", "dict-subclass", "json-list", "final-var"],
)
def test_final_reaches_the_host_as_plain_data(sandbox: str, final: str, expected: Any) -> None:
    from rlm import REPLEnv

    with REPLEnv(sandbox=sandbox) as env:
        assert env.execute(FINAL_OBJECTS).error is None
        result = env.execute(final)
    assert result.error is None, result.error
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(result.final), result.final
    else:
        assert result.final == expected

    def exact(value: Any) -> bool:
        # Every value is of an exact builtin type: nothing of the cell's classes is left.
        if type(value) in (dict,):
            return all(type(k) is str and exact(v) for k, v in value.items())
        if type(value) is list:
            return all(exact(v) for v in value)
        return type(value) in (str, int, float, bool, type(None))

    assert exact(result.final)


def test_an_untyped_run_answers_plain_data_as_json(closing: list[RLM]) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL({'ids': ['a', 'b'], 'ok': True})")]}) as srv:
        result = make_rlm(srv, closing).completion("x", "Which ids?")
    assert result.answer == '{"ids": ["a", "b"], "ok": true}'
    assert result.output is None


def test_the_last_turn_answer_is_validated_too(closing: list[RLM]) -> None:
    script = [repl("print(len(context))"), 'FINAL({"count": 2, "ids": ["a", "b"]})']
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        result = make_rlm(srv, closing, max_iterations=1).completion("ab", "How many?", schema=Counted)
    assert result.stopped_reason == "max_iterations"
    assert result.output == Counted(count=2, ids=["a", "b"])

    with FakeLLMServer(scripts={ROOT: [repl("print(1)"), "FINAL(many)"]}) as srv:
        result = make_rlm(srv, closing, max_iterations=1).completion("ab", "How many?", schema=Counted)
    assert result.stopped_reason == "invalid_answer" and result.raw_output == "many"
