"""What checking a value against a schema may cost: exponential schemas refused when they
are accepted, a depth cap and a time budget on values, and checks that never hold the
event loop other sub-queries share."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from rlm_support import ROOT, make_rlm, repl, wait_until

import rlm.schema
from rlm import RLM, AsyncOpenAIClient, REPLEnv
from rlm import loop as engine
from rlm.errors import ConfigError
from rlm.schema import Schema
from rlm.structured import acheck_subquery_schema, check_subquery_schema
from rlm.testing import FakeLLMServer

# The reproduction: 82 bytes, cost doubling with each level of the value.
DOUBLING = {"type": ["array", "integer"], "items": {"allOf": [{"$ref": "#"}, {"$ref": "#"}]}}
# Accepted (each item costs 300 checks, not more per level) but slow on a long list.
SLOW_ITEMS = {"type": "array", "items": {"allOf": [{"type": "integer"}] * 300}}


class Node(BaseModel):
    value: int
    children: list[Node] = []


def refusal(spec: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        Schema.of(spec)
    return str(info.value)


def test_a_schema_that_applies_itself_twice_per_level_is_refused() -> None:
    assert "exponential time" in refusal(DOUBLING)


def test_recursion_through_defs_with_two_branches_is_refused() -> None:
    spec = {"$defs": {"n": {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/n"}, {"$ref": "#/$defs/n"}]}}},
            "$ref": "#/$defs/n"}
    assert "exponential time" in refusal(spec)


def test_a_chain_of_doubling_definitions_is_refused_without_recursion() -> None:
    defs: dict[str, Any] = {"a0": {"type": "integer"}}
    for i in range(1, 40):
        defs[f"a{i}"] = {"oneOf": [{"$ref": f"#/$defs/a{i - 1}"}, {"$ref": f"#/$defs/a{i - 1}"}]}
    assert "exponential time" in refusal({"$defs": defs, "$ref": "#/$defs/a39"})


def test_a_reference_loop_that_stays_on_one_value_is_refused() -> None:
    spec = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}
    assert "never ends" in refusal(spec)
    assert "never ends" in refusal({"type": "array", "items": {"not": {"$ref": "#/items"}}})


def test_recursive_schemas_that_descend_once_per_reference_are_accepted() -> None:
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "left": {"$ref": "#/$defs/node"}, "right": {"$ref": "#/$defs/node"},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"}
    assert Schema.of(tree).validate({"left": {"right": {}}, "kids": [{}, {"left": {}}]}).ok
    generated = Schema.of(Node.model_json_schema())
    assert generated.validate({"value": 1, "children": [{"value": 2, "children": []}]}).ok


def test_a_sub_query_schema_that_doubles_is_refused_as_a_type_error() -> None:
    with pytest.raises(TypeError, match="exponential time"):
        check_subquery_schema(DOUBLING)


@pytest.mark.parametrize("keyword", [
    {"$anchor": "x"}, {"$dynamicRef": "#x"}, {"$recursiveRef": "#"}, {"$ref": "#x"},
    {"properties": {"a": {"$id": "https://example.invalid/a", "$ref": "#"}}},
])
def test_a_sub_query_schema_naming_references_other_than_pointers_is_refused(keyword: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="not supported"):
        check_subquery_schema({"type": "object", **keyword})


def test_a_sub_query_schema_with_too_many_values_is_refused_while_it_is_copied() -> None:
    with pytest.raises(TypeError, match="more than 64,000 values"):
        check_subquery_schema({"enum": list(range(100_000))})


def test_unique_items_tells_json_equal_values_apart_like_json_schema() -> None:
    unique = Schema.of({"type": "array", "uniqueItems": True})
    assert unique.validate([1, True, "1", [1], {"a": 1}]).ok
    assert not unique.validate([1, 1.0]).ok
    assert not unique.validate([{"a": [1, {"b": None}]}, {"a": [1, {"b": None}]}]).ok
    assert not unique.validate([[False], [False]]).ok


def test_unique_items_on_a_huge_array_of_objects_completes_within_the_budget() -> None:
    # Objects cannot be sorted: jsonschema's own check compared every pair (quadratic).
    items = [{"id": i, "tags": [str(i)]} for i in range(50_000)]
    unique = Schema.of({"type": "array", "uniqueItems": True})
    assert unique.validate(items).ok
    (issue,) = unique.validate([*items, {"id": 7, "tags": ["7"]}]).issues
    assert issue.expected == "uniqueItems true"


def test_a_value_nested_deeper_than_the_cap_is_an_issue() -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    (issue,) = Schema.of({"type": "array"}).validate(deep).issues
    assert issue.expected == "a value nested at most 64 levels deep"
    (issue,) = Schema.of(list[Any]).validate(deep).issues
    assert issue.received == "a value nested deeper"


def test_a_value_that_contains_itself_is_an_issue_not_a_hang() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert not Schema.of({"type": "array"}).validate(loop).ok


def test_a_check_past_its_time_budget_stops_with_an_issue() -> None:
    schema = Schema.of(SLOW_ITEMS)
    schema.time_budget_s = 0.2
    (issue,) = schema.validate(list(range(100_000))).issues
    assert issue.expected == "a value this schema can check within 0.2 s"


def test_a_slow_check_leaves_the_engine_loop_to_other_calls(server: FakeLLMServer) -> None:
    schema = Schema.of(SLOW_ITEMS)
    schema.time_budget_s = 2.0
    client = AsyncOpenAIClient(api_key="k", base_url=server.url, max_retries=0)

    async def main() -> tuple[int, list[Any]]:
        check = asyncio.ensure_future(schema.avalidate(list(range(200_000))))
        replies = 0
        while not check.done():
            assert await client.completion(f"ECHO beside {replies}") == f"beside {replies}"
            replies += 1
        return replies, list((await check).issues)

    try:
        replies, issues = engine.run_sync(main())
    finally:
        client.close_sync()
    # A check on the loop would have let at most the first call through before it ended.
    assert replies >= 3
    assert issues[0].expected.startswith("a value this schema can check within")


@pytest.fixture
def short_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(rlm.schema, "VALIDATION_BUDGET_S", 2.0)
    yield


def test_a_slow_structured_reply_does_not_hold_another_repls_sub_queries(short_budget: None) -> None:
    def answer(messages: list[dict[str, Any]], response_format: dict[str, Any]) -> Any:
        # The first ask gets a long list (its check runs out of time); the re-ask a short one.
        return [1] if any(m["role"] == "assistant" for m in messages) else list(range(200_000))

    with FakeLLMServer(json_responder=answer) as srv:
        client = AsyncOpenAIClient(model="sub", api_key="k", base_url=srv.url, max_retries=0)
        try:
            with REPLEnv(client=client) as slow_env, REPLEnv(client=client) as other_env:
                outcome: list[Any] = []
                cell = threading.Thread(target=lambda: outcome.append(
                    slow_env.execute(f"r = llm_query('BIG', schema={SLOW_ITEMS!r})\nprint(r)")))
                cell.start()
                assert wait_until(lambda: srv.requests >= 1)
                replies = 0
                while srv.requests - replies < 2:  # until the re-ask arrives
                    r = other_env.execute(f"print(llm_query('ECHO beside {replies}'))")
                    assert r.stdout == f"beside {replies}\n", r.error
                    replies += 1
                cell.join(60)
        finally:
            client.close_sync()
    assert outcome and outcome[0].error is None and outcome[0].stdout == "[1]\n"
    assert replies >= 3


def test_a_slow_typed_answer_check_does_not_hold_other_calls(short_budget: None, closing: list[RLM]) -> None:
    # The root's FINAL value is checked on the loop the run uses (the engine loop here).
    big = repl("FINAL(list(range(200_000)))")
    with FakeLLMServer(scripts={ROOT: [big, repl("FINAL([1])")]}) as srv:
        events: list[dict[str, Any]] = []
        rlm = make_rlm(srv, closing, on_event=events.append)
        outcome: list[Any] = []
        run = threading.Thread(target=lambda: outcome.append(
            rlm.completion("ctx", "List the numbers.", schema=SLOW_ITEMS)))
        run.start()
        # The check starts once the cell's FINAL is recorded.
        assert wait_until(lambda: any(e["type"] == "final" for e in events))
        replies = 0
        while srv.requests - replies < 2:  # until the root is told its answer did not pass
            text = engine.run_sync(rlm.sub_client.completion(f"ECHO beside {replies}"))
            assert text == f"beside {replies}"
            replies += 1
        run.join(60)
    assert outcome and outcome[0].output == [1]
    assert replies >= 3


def test_accepting_a_large_sub_query_schema_leaves_the_engine_loop_to_other_calls(server: FakeLLMServer) -> None:
    # Checking a schema against its metaschema costs about 25 us per byte.
    large = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(1_800)}}
    client = AsyncOpenAIClient(api_key="k", base_url=server.url, max_retries=0)

    async def main() -> tuple[int, Schema]:
        accepting = asyncio.ensure_future(acheck_subquery_schema(large))
        replies = 0
        while not accepting.done():
            assert await client.completion(f"ECHO beside {replies}") == f"beside {replies}"
            replies += 1
        return replies, await accepting

    try:
        replies, schema = engine.run_sync(main())
    finally:
        client.close_sync()
    assert replies >= 3
    assert schema.validate({"field_7": "x"}).ok
