"""Structured sub-queries: llm_query(..., schema={...}) from REPL code, on FakeLLMServer."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from rlm import RLM, AsyncOpenAIClient, REPLEnv
from rlm.testing import FakeLLMServer

ROOT = "root-model"
SUB = "sub-model"
COUNT = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}


def repl(code: str) -> str:
    return f"Next.\n```repl\n{code}\n```"


def count_xs(messages: list[dict[str, Any]], response_format: dict[str, Any]) -> dict[str, int]:
    """A sub-model that counts the x's of the last user message, answering the schema."""
    text = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return {"count": text.count("x")}


@pytest.fixture
def clients() -> Iterator[list[AsyncOpenAIClient]]:
    made: list[AsyncOpenAIClient] = []
    yield made
    for c in made:
        c.close_sync()


def client_for(srv: FakeLLMServer, made: list[AsyncOpenAIClient], model: str = SUB) -> AsyncOpenAIClient:
    client = AsyncOpenAIClient(model=model, api_key="k", base_url=srv.url, max_retries=0)
    made.append(client)
    return client


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_a_batch_over_100_chunks_aggregates_exactly(clients: list[AsyncOpenAIClient], sandbox: str) -> None:
    lines = [("x" * (i % 7)) + "-" + ("y" * (i % 3)) for i in range(1000)]
    context = "\n".join(lines)
    script = [
        repl(
            "lines = context.split('\\n')\n"
            "chunks = ['\\n'.join(lines[i:i + 10]) for i in range(0, len(lines), 10)]\n"
            f"schema = {COUNT!r}\n"
            "replies = llm_query_batch(['Count:\\n' + c for c in chunks], schema=schema)\n"
            "print(len(replies), type(replies[0]).__name__)\n"
            "FINAL(sum(r['count'] for r in replies))"
        )
    ]
    with FakeLLMServer(json_responder=count_xs, scripts={ROOT: script}) as srv:
        rlm = RLM(model=ROOT, recursive_model=SUB, client=client_for(srv, clients, ROOT),
                  sub_client=client_for(srv, clients), sandbox=sandbox)
        result = rlm.completion(context, "How many x characters?", schema=int)
        sub_requests = [r for r in srv.requests_log if r["model"] == SUB]
    assert result.output == context.count("x")
    assert result.sub_calls == 100
    # The line pattern repeats, so some chunks are identical: twins in flight together
    # share one request (single-flight). The first prompt goes alone (it learns whether
    # the server takes response_format), so its own twins may ask once more.
    distinct = len({"\n".join(lines[i:i + 10]) for i in range(0, len(lines), 10)})
    assert distinct <= len(sub_requests) <= distinct + 1
    usage = result.usage["sub"]
    assert usage.calls == len(sub_requests)
    assert usage.calls + usage.cached_calls == 100  # counted like any sub-query
    # The request asked for the schema through response_format.
    assert sub_requests[0]["params"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": COUNT, "strict": False},
    }


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_a_server_that_rejects_response_format_is_asked_with_instructions(
    clients: list[AsyncOpenAIClient], sandbox: str
) -> None:
    def fenced(messages: list[dict[str, Any]]) -> str:
        assert "JSON Schema" in messages[0]["content"]  # the instructions, as a system message
        return "Here you go:\n```json\n" + json.dumps({"count": messages[-1]["content"].count("x")}) + "\n```"

    with FakeLLMServer(fenced, response_format=False) as srv:
        with REPLEnv(client=client_for(srv, clients), sandbox=sandbox) as env:
            r = env.execute(f"out = llm_query_batch(['xx', 'xxx', 'x', ''], schema={COUNT!r})\nprint(out)")
            again = env.execute(f"print(llm_query('xxxx', schema={COUNT!r}))")
        log = srv.requests_log
    assert r.error is None, r.error
    assert r.stdout.strip() == "[{'count': 2}, {'count': 3}, {'count': 1}, {'count': 0}]"
    assert again.stdout.strip() == "{'count': 4}"
    # One probe was refused; after that the client remembers and never sends it again.
    assert len(log) == 6
    assert "response_format" in log[0]["params"]
    assert all("response_format" not in entry["params"] for entry in log[1:])


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_a_reply_that_never_matches_is_an_error_slot_and_a_single_query_raises(
    clients: list[AsyncOpenAIClient], sandbox: str
) -> None:
    def answer(messages: list[dict[str, Any]], response_format: dict[str, Any]) -> Any:
        prompt = messages[0]["content"]
        return {"count": 5} if prompt == "good" else {"count": "many"}

    with FakeLLMServer(json_responder=answer) as srv:
        with REPLEnv(client=client_for(srv, clients), sandbox=sandbox) as env:
            r = env.execute(f"out = llm_query_batch(['good', 'bad'], schema={COUNT!r})\nprint(out)")
            single = env.execute(
                f"try:\n    llm_query('bad', schema={COUNT!r})\nexcept LLMQueryError as e:\n    print('caught', e)"
            )
        retried = [e for e in srv.requests_log if e["messages"][0]["content"] == "bad"]
    assert r.error is None, r.error
    good, bad = eval(r.stdout.strip())  # noqa: S307 - the repr of plain data printed by the cell
    assert good == {"count": 5}
    assert bad.startswith("[llm_query error: the reply does not match the schema: $.count: expected integer")
    assert "1 of 2 sub-queries failed" in r.stderr
    assert single.stdout.startswith("caught the reply does not match the schema")
    # Each bad reply was re-asked once, with the issues.
    assert len(retried) == 4
    assert "does not match the JSON Schema" in retried[1]["messages"][-1]["content"]


def test_a_schema_with_a_regular_expression_is_refused_in_the_cell(clients: list[AsyncOpenAIClient]) -> None:
    schema = {"type": "string", "pattern": "^(a+)+$"}
    with FakeLLMServer() as srv:
        with REPLEnv(client=client_for(srv, clients)) as env:
            r = env.execute(f"llm_query('hi', schema={schema!r})")
        assert srv.requests == 0
    assert r.error is not None and "schema uses pattern" in r.error


def test_a_dict_subclass_schema_is_read_without_its_methods(clients: list[AsyncOpenAIClient]) -> None:
    # The sandbox's own check reads items() once, in the cell; any later call (from the
    # host) would get a different schema, and the request would show it.
    code = (
        "seen = []\n"
        "class Sneaky(dict):\n"
        "    def items(self):\n"
        "        seen.append(1)\n"
        "        return [(k, self[k]) for k in self] if len(seen) == 1 else [('type', 'string')]\n"
        "s = Sneaky(type='object', properties={'count': {'type': 'integer'}})\n"
        "print(llm_query('xx', schema=s))"
    )
    with FakeLLMServer(json_responder=count_xs) as srv:
        with REPLEnv(client=client_for(srv, clients)) as env:
            r = env.execute(code)
        sent = srv.requests_log[0]["params"]["response_format"]["json_schema"]["schema"]
    assert sent == {"type": "object", "properties": {"count": {"type": "integer"}}}
    assert re.fullmatch(r"\{'count': 2\}\s*", r.stdout), (r.stdout, r.error)


def test_at_depth_two_a_structured_sub_query_is_a_typed_child_run(clients: list[AsyncOpenAIClient]) -> None:
    def root(messages: list[dict[str, Any]]) -> str:
        first = messages[1]["content"]
        if "request from a parent model" in first:  # the child's run
            assert '"count"' in messages[0]["content"]  # it was shown the schema
            return repl("FINAL({'count': context.count('x')})")
        return repl(f"r = llm_query('xxxx', schema={COUNT!r})\nFINAL(r['count'] * 10)")

    with FakeLLMServer(root) as srv:
        rlm = RLM(model=ROOT, recursive_model=SUB, client=client_for(srv, clients, ROOT),
                  sub_client=client_for(srv, clients), sandbox="local", max_depth=2)
        result = rlm.completion("ignored", "Count via a child.")
    assert result.answer == "40"
    assert result.sub_calls == 1
