"""Typed answers: a schema as JSON Schema text for a prompt, validation, error feedback.

A schema is one of three things, all wrapped by :class:`Schema`:

- a pydantic model class (``class Invoice(BaseModel): ...``);
- any other type pydantic's ``TypeAdapter`` accepts (``list[str]``, ``dict[str, int]``,
  a ``TypedDict``, a dataclass, ``int``);
- a JSON Schema dict, validated with the ``jsonschema`` library.

Validation never raises for a bad value: it returns the validated output or a list of
:class:`SchemaIssue` (path, expected, received), short enough to go back to a model so
it can fix its value. A value that arrives as text (a model wrote its answer in prose,
or a reply to a sub-query) is parsed first: JSON, optionally inside a code fence, or a
Python literal.

Checking is bounded (``rlm.schema_bounds``): a JSON Schema whose cost would be
exponential is refused when it is accepted, a value nested deeper than
``MAX_VALUE_DEPTH`` is an issue, a check that runs past ``time_budget_s`` stops with an
issue, and ``avalidate``/``avalidate_answer`` run the check in a thread so that an event
loop is never held by it.
"""

from __future__ import annotations

import ast
import json
import re
import reprlib
from dataclasses import dataclass
from itertools import islice
from typing import Any

from rlm.errors import ConfigError
from rlm.schema_bounds import (
    MAX_VALUE_DEPTH,
    OverBudget,
    bounded_validator,
    cost_problem,
    deadline,
    deeper_than,
    off_loop,
)

__all__ = ["Schema", "SchemaIssue", "Validation", "format_issues", "parse_json_text"]

# Longest repr of a received value shown in an issue: enough to see what went wrong,
# short enough that a 1 MB wrong answer does not flood the next prompt.
RECEIVED_CHARS = 80
# How many issues, and how much text, one feedback message carries.
MAX_ISSUES = 20
ISSUES_BUDGET = 2_000
# Seconds one check may take before it stops with an issue (the value is refused).
VALIDATION_BUDGET_S = 5.0
# Errors read from a JSON Schema validator: far more than feedback shows, and a bound on
# the work of a value with a million wrong items.
_ERRORS_READ = 200

# A repr that stops early: a 1 MB wrong answer costs a few dozen characters to show.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = RECEIVED_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8

_FENCE_BLOCK = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(?P<body>.*?)```", re.DOTALL)


@dataclass(frozen=True)
class SchemaIssue:
    """One reason a value does not match a schema.

    ``path`` locates the offending part (``$`` is the value itself, ``$.ids[2]`` the
    third item of its ``ids``), ``expected`` says what the schema wants there and
    ``received`` what was found (a repr cut to a few dozen characters, or "nothing"
    for a missing key).
    """

    path: str
    expected: str
    received: str

    def __str__(self) -> str:
        return f"{self.path}: expected {self.expected}, received {self.received}"

    def to_dict(self) -> dict[str, str]:
        """The issue as a JSON-ready dict."""
        return {"path": self.path, "expected": self.expected, "received": self.received}


@dataclass(frozen=True)
class Validation:
    """The outcome of :meth:`Schema.validate`: ``ok`` with ``output`` (the validated
    object), or not ok with ``issues`` (never empty then)."""

    ok: bool
    output: Any = None
    issues: tuple[SchemaIssue, ...] = ()


def _received(value: Any) -> str:
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still an issue to report
        text = f"<{type(value).__name__}>"
    if len(text) > RECEIVED_CHARS:
        text = text[: RECEIVED_CHARS - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _path(parts: Any) -> str:
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}"
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def format_issues(issues: tuple[SchemaIssue, ...] | list[SchemaIssue], budget: int = ISSUES_BUDGET) -> str:
    """The issues as "- path: expected X, received Y" lines, cut to ``budget`` characters.

    At most ``MAX_ISSUES`` lines are kept; what is left out is counted on a last line,
    so the reader knows there is more.
    """
    lines: list[str] = []
    used = 0
    for issue in issues[:MAX_ISSUES]:
        line = f"- {issue}"
        if lines and used + len(line) > budget:
            break
        lines.append(line[:budget])
        used += len(line) + 1
    left = len(issues) - len(lines)
    if left:
        lines.append(f"- ... and {left} more issue{'s' if left != 1 else ''}")
    return "\n".join(lines)


def parse_json_text(text: str) -> Any:
    """Parse a model's JSON reply: plain JSON, or JSON in the first ``` code fence.

    Prose around a fence is tolerated (models often add a sentence). Raises ValueError
    when no JSON value can be read.
    """
    try:
        return _loads(text)
    except ValueError:
        match = _FENCE_BLOCK.search(text)
        if match is None:
            raise
    return _loads(match.group("body"))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("the JSON is nested too deeply") from exc


class Schema:
    """A schema for typed answers; build one with :meth:`Schema.of`.

    ``json_schema`` is the JSON Schema dict (what prompts show and ``response_format``
    sends); ``name`` a short name for it; ``validate`` checks a value and
    ``to_json`` turns a validated output back into plain JSON data.
    ``time_budget_s`` bounds one check (a JSON Schema's; a pydantic check cannot be
    stopped and is only bounded by the depth cap).
    """

    def __init__(self, spec: Any, json_schema: dict[str, Any], name: str, adapter: Any, validator: Any) -> None:
        self.spec = spec
        self.json_schema = json_schema
        self.name = name
        self.time_budget_s = VALIDATION_BUDGET_S
        self._adapter = adapter
        self._validator = validator

    def __repr__(self) -> str:
        kind = "json_schema" if self._validator is not None else "pydantic"
        return f"Schema({self.name!r}, {kind})"

    @classmethod
    def of(cls, spec: Any) -> Schema:
        """Wrap a pydantic model class, a type ``TypeAdapter`` accepts, or a JSON Schema dict.

        A ``Schema`` is returned as is. Raises ConfigError for anything else, for a
        dict that is not a valid JSON Schema (the message names the problem), and for
        one whose checking could take exponential time or never end.
        """
        if isinstance(spec, Schema):
            return spec
        if isinstance(spec, dict):
            return cls._of_json_schema(spec)
        if isinstance(spec, (str, bytes, int, float, list, tuple)) or spec is None:
            raise ConfigError(
                f"schema must be a pydantic model class, a type such as list[str], or a JSON "
                f"Schema dict, not {type(spec).__name__} {spec!r:.60}"
            )
        from pydantic import PydanticSchemaGenerationError, TypeAdapter

        try:
            adapter = TypeAdapter(spec)
            json_schema = adapter.json_schema()
        except (PydanticSchemaGenerationError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"schema {spec!r:.80} is not a type pydantic can validate ({exc}); pass a "
                "pydantic model class, a type such as list[str], or a JSON Schema dict"
            ) from exc
        name = getattr(spec, "__name__", None) or str(json_schema.get("title") or "answer")
        return cls(spec, json_schema, _safe_name(name), adapter, None)

    @classmethod
    def _of_json_schema(cls, spec: dict[str, Any]) -> Schema:
        import jsonschema

        try:
            json.dumps(spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a JSON Schema must be plain JSON data: {exc}") from exc
        validator_cls = jsonschema.validators.validator_for(spec, default=jsonschema.Draft202012Validator)
        try:
            validator_cls.check_schema(spec)
        except jsonschema.SchemaError as exc:
            where = _path(exc.absolute_path)
            raise ConfigError(f"the schema is not a valid JSON Schema at {where}: {exc.message}") from exc
        problem = cost_problem(spec)
        if problem is not None:
            raise ConfigError(f"the schema cannot be checked in bounded time: {problem}")
        name = str(spec.get("title") or "answer")
        return cls(spec, spec, _safe_name(name), None, bounded_validator(validator_cls)(spec))

    # -- use ---------------------------------------------------------------------------

    def prompt_text(self) -> str:
        """The JSON Schema as compact, readable JSON text for a prompt."""
        return json.dumps(self.json_schema, indent=1, ensure_ascii=False)

    def validate(self, value: Any) -> Validation:
        """Check ``value`` against the schema; never raises for a bad value.

        A pydantic schema validates in its default (lax) mode, so ``"3"`` is accepted for
        an int and the output is the converted object (a model instance for a model
        class). A JSON Schema checks the value as is; its output is the value itself.
        A value nested deeper than ``MAX_VALUE_DEPTH``, or whose check takes longer
        than ``time_budget_s``, gets one issue saying so. Blocking: on an event loop,
        await ``avalidate`` instead.
        """
        try:
            with deadline(self.time_budget_s):
                if deeper_than(value, MAX_VALUE_DEPTH):
                    return Validation(False, issues=(SchemaIssue(
                        "$", f"a value nested at most {MAX_VALUE_DEPTH} levels deep", "a value nested deeper"),))
                if self._validator is not None:
                    return self._validate_json_schema(value)
        except OverBudget:
            return Validation(False, issues=(SchemaIssue(
                "$", f"a value this schema can check within {self.time_budget_s:g} s",
                "one that took longer to check (make it smaller)"),))
        from pydantic import ValidationError

        try:
            return Validation(True, self._adapter.validate_python(value))
        except ValidationError as exc:
            issues = tuple(_pydantic_issue(e) for e in exc.errors(include_url=False))
            return Validation(False, issues=issues or (SchemaIssue("$", self.name, _received(value)),))
        except RecursionError:
            return Validation(False, issues=(SchemaIssue("$", self.name, "a value nested too deeply"),))

    def validate_answer(self, value: Any) -> Validation:
        """Like ``validate``, and a str that fails is parsed and tried again.

        A model may give its answer as JSON text (``FINAL('{"count": 3}')``), inside a
        code fence, or as a Python literal written in prose (``FINAL({'count': 3})``).
        When the text parses, the parsed value's result is returned (valid or not);
        when it does not, the str's own issues are. Blocking, like ``validate``.
        """
        first = self.validate(value)
        if first.ok or not isinstance(value, str):
            return first
        parsed = _parse_answer_text(value)
        if parsed is _UNPARSED:
            return first
        return self.validate(parsed)

    async def avalidate(self, value: Any) -> Validation:
        """``validate`` in a validation thread: the awaiting event loop stays free."""
        return await off_loop(self.validate, value)

    async def avalidate_answer(self, value: Any) -> Validation:
        """``validate_answer`` in a validation thread: the awaiting event loop stays free."""
        return await off_loop(self.validate_answer, value)

    def to_json(self, output: Any) -> Any:
        """A validated output as plain JSON data (a model instance becomes a dict)."""
        if self._adapter is None:
            return output
        return self._adapter.dump_python(output, mode="json")

    def dumps(self, output: Any) -> str:
        """A validated output as JSON text (what ``RLMResult.answer`` holds)."""
        return json.dumps(self.to_json(output), ensure_ascii=False)

    def _validate_json_schema(self, value: Any) -> Validation:
        try:
            errors = sorted(islice(self._validator.iter_errors(value), _ERRORS_READ),
                            key=lambda e: list(map(str, e.absolute_path)))
        except OverBudget:
            raise
        except RecursionError:
            return Validation(False, issues=(SchemaIssue("$", self.name, "a value nested too deeply"),))
        except Exception as exc:  # noqa: BLE001 - e.g. an unresolvable $ref: the value cannot pass
            return Validation(False, issues=(SchemaIssue("$", f"a value the schema can check ({exc})"[:200], _received(value)),))
        if not errors:
            return Validation(True, value)
        return Validation(False, issues=tuple(_json_schema_issue(e) for e in errors))


_UNPARSED = object()


def _parse_answer_text(text: str) -> Any:
    try:
        return parse_json_text(text)
    except ValueError:
        pass
    try:
        # A Python literal only: no names, calls or operators are evaluated.
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _UNPARSED


def _safe_name(name: str) -> str:
    # response_format names allow letters, digits, "_" and "-", up to 64 characters.
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "answer"
    return cleaned[:64]


def _pydantic_issue(error: Any) -> SchemaIssue:
    loc = error.get("loc", ())
    kind = error.get("type", "")
    message = str(error.get("msg", "a valid value"))
    if kind == "missing":
        return SchemaIssue(_path(loc), "a value (the key is required)", "nothing")
    expected = message.removeprefix("Input should be ").removeprefix("Value error, ")
    return SchemaIssue(_path(loc), expected, _received(error.get("input")))


def _json_schema_issue(error: Any) -> SchemaIssue:
    keyword = error.validator
    want = error.validator_value
    path = _path(error.absolute_path)
    if keyword == "type":
        kinds = want if isinstance(want, list) else [want]
        return SchemaIssue(path, " or ".join(map(str, kinds)), _received(error.instance))
    if keyword == "required":
        missing = [k for k in want if isinstance(error.instance, dict) and k not in error.instance]
        name = missing[0] if missing else "?"
        return SchemaIssue(_path([*error.absolute_path, name]), "a value (the key is required)", "nothing")
    if keyword == "additionalProperties" and isinstance(error.instance, dict):
        return SchemaIssue(path, "no other keys", error.message[:RECEIVED_CHARS])
    if keyword in ("enum", "const"):
        shown = json.dumps(want, ensure_ascii=False)
        shown = shown if len(shown) <= RECEIVED_CHARS else shown[: RECEIVED_CHARS - 3] + "..."
        return SchemaIssue(path, f"{'one of ' if keyword == 'enum' else ''}{shown}", _received(error.instance))
    shown = json.dumps(want, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= RECEIVED_CHARS else shown[: RECEIVED_CHARS - 3] + "..."
    return SchemaIssue(path, f"{keyword} {shown}", _received(error.instance))
