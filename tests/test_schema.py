"""rlm.schema: what a schema accepts, what it tells a prompt, and how it reports a bad value."""

from __future__ import annotations

import json

import pytest
from rlm_support import Counted, Totals

from rlm.errors import ConfigError
from rlm.schema import Schema, SchemaIssue, format_issues, parse_json_text

COUNTED_JSON = {
    "type": "object",
    "properties": {"count": {"type": "integer"}, "ids": {"type": "array", "items": {"type": "string"}}},
    "required": ["count", "ids"],
}


def test_a_model_class_validates_into_an_instance() -> None:
    schema = Schema.of(Counted)
    result = schema.validate({"count": 3, "ids": ["a", "b", "c"]})
    assert result.ok
    assert result.output == Counted(count=3, ids=["a", "b", "c"])
    assert schema.dumps(result.output) == '{"count": 3, "ids": ["a", "b", "c"]}'


def test_a_wrong_field_is_reported_with_its_path_expectation_and_value() -> None:
    result = Schema.of(Counted).validate({"count": "many", "ids": ["a", 2]})
    assert not result.ok
    assert result.issues[0] == SchemaIssue("$.count", "a valid integer, unable to parse string as an integer", "'many' (str)")
    assert result.issues[1].path == "$.ids[1]"
    assert result.issues[1].received == "2 (int)"


def test_a_missing_key_is_reported_as_received_nothing() -> None:
    (issue,) = Schema.of(Counted).validate({"count": 1}).issues
    assert issue.path == "$.ids"
    assert issue.received == "nothing"


def test_list_of_str_typeddict_and_int_are_schemas() -> None:
    assert Schema.of(list[str]).validate(["x", "y"]).output == ["x", "y"]
    assert not Schema.of(list[str]).validate("x").ok
    assert Schema.of(Totals).validate({"total": 5, "currency": "EUR"}).output == {"total": 5, "currency": "EUR"}
    assert Schema.of(Totals).validate({"total": 5}).issues[0].path == "$.currency"
    assert Schema.of(int).validate(7).output == 7
    assert Schema.of(dict[str, int]).json_schema == {"type": "object", "additionalProperties": {"type": "integer"}}


def test_a_json_schema_dict_validates_plain_data() -> None:
    schema = Schema.of(COUNTED_JSON)
    assert schema.validate({"count": 3, "ids": ["a"]}).output == {"count": 3, "ids": ["a"]}
    issues = schema.validate({"count": "many"}).issues
    assert [str(i) for i in issues] == [
        "$.ids: expected a value (the key is required), received nothing",
        "$.count: expected integer, received 'many' (str)",
    ]


def test_an_invalid_json_schema_is_a_config_error_naming_the_problem() -> None:
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        Schema.of({"type": "integr"})


def test_a_non_schema_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="schema must be"):
        Schema.of("list[str]")


def test_the_prompt_text_is_the_json_schema() -> None:
    text = Schema.of(Counted).prompt_text()
    assert json.loads(text)["required"] == ["count", "ids"]


def test_an_answer_given_as_text_is_parsed_before_it_is_validated() -> None:
    schema = Schema.of(Counted)
    assert schema.validate_answer('{"count": 2, "ids": ["a", "b"]}').output.count == 2
    assert schema.validate_answer("{'count': 2, 'ids': ['a', 'b']}").output.ids == ["a", "b"]
    assert schema.validate_answer('```json\n{"count": 1, "ids": []}\n```').output.count == 1
    assert schema.validate_answer('{"count": "x", "ids": []}').issues[0].path == "$.count"
    # A str schema keeps the text as it is.
    assert Schema.of(str).validate_answer('{"a": 1}').output == '{"a": 1}'


def test_parse_json_text_tolerates_fences_and_prose() -> None:
    assert parse_json_text('[1, 2]') == [1, 2]
    assert parse_json_text('Here it is:\n```json\n{"a": 1}\n```\nDone.') == {"a": 1}
    with pytest.raises(ValueError):
        parse_json_text("no json here")


def test_issue_text_is_cut_to_its_budget() -> None:
    issues = Schema.of(list[int]).validate(["x" * 500] * 100).issues
    text = format_issues(issues, budget=600)
    assert len(text) < 800
    assert text.endswith("more issues")
    assert all(len(i.received) < 100 for i in issues)
