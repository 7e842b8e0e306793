"""Structured sub-queries: a JSON Schema in, a parsed and validated value out.

``llm_query(prompt, schema={...})`` and the batch and async forms end here, in the
host. The request asks for the schema through the server's ``response_format``
(``json_schema``); a server that rejects that (a 400 or 422 naming
``response_format``/``json_schema``) is remembered, per client and per kind of root
(object or not), and asked instead with instructions in a system message, the reply
parsed with code fences tolerated. A reply that does not match is re-asked once with
the issues; if it still does not match, the call fails with ``SchemaMismatchError``,
which a batch turns into its slot's ``"[llm_query error: ...]"`` text.

The schema comes from REPL code, so it is checked before use: plain JSON, bounded in
size, a valid JSON Schema, without the regular-expression keywords (``pattern``,
``patternProperties``) that would run a pattern of the code's choosing in the host, and
without references outside the schema.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from rlm import prompts
from rlm.errors import ConfigError, LLMError, ResponseError
from rlm.schema import Schema, SchemaIssue, format_issues, parse_json_text

__all__ = [
    "MAX_SCHEMA_CHARS",
    "SchemaMismatchError",
    "check_subquery_schema",
    "structured_batch",
    "structured_query",
]

# A schema is a description, not data: 64 KB of JSON is far more than any real one.
MAX_SCHEMA_CHARS = 64_000
# Re-asks after a reply that does not match (the model sees the issues each time).
REASKS = 1

Send = Callable[[list[dict[str, Any]], dict[str, Any]], Awaitable[str]]

# Whether a client's endpoint takes response_format={"type": "json_schema"}: unknown
# (absent), True or False, per kind of schema root. Weak keys: a closed and dropped
# client takes its entry with it.
_native: weakref.WeakKeyDictionary[Any, dict[bool, bool]] = weakref.WeakKeyDictionary()


class SchemaMismatchError(ResponseError):
    """A structured sub-query's reply still did not match its schema after a re-ask."""


def check_subquery_schema(schema: Any) -> Schema:
    """The ``Schema`` for a JSON Schema dict passed by REPL code, or TypeError saying why not.

    Refused: anything but a dict of plain JSON data, more than ``MAX_SCHEMA_CHARS``
    of JSON, an invalid JSON Schema, the ``pattern``/``patternProperties`` keywords
    (their regular expressions would run in the host) and ``$ref`` outside the schema.
    """
    if not issubclass(type(schema), dict):
        raise TypeError(
            f"llm_query's schema must be a JSON Schema dict such as "
            f"{{'type': 'array', 'items': {{'type': 'string'}}}}, not {type(schema).__name__}"
        )
    schema = _plain(schema)
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"llm_query's schema must be plain JSON data: {exc}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise TypeError(f"llm_query's schema is {len(text):,} characters of JSON; the limit is {MAX_SCHEMA_CHARS:,}")
    found = _refused_keyword(schema)
    if found:
        raise TypeError(
            f"llm_query's schema uses {found}, which is not supported in sub-query schemas "
            "(regular expressions and outside references would run in the host); check "
            "such things in your code instead"
        )
    try:
        return Schema.of(schema)
    except ConfigError as exc:
        raise TypeError(f"llm_query's schema: {exc}") from None


def _plain(value: Any, depth: int = 0) -> Any:
    """A copy of JSON-like data made of exact builtin types, read without calling any
    method a subclass could override (from the in-process sandbox, a dict subclass's
    ``items`` would be cell code running on the host's engine loop)."""
    if depth > 64:
        raise TypeError("llm_query's schema is nested deeper than 64 levels")
    # type(), not isinstance(): isinstance consults a __class__ the object may fake.
    kind = type(value)
    if value is None or kind is bool:
        return value
    if issubclass(kind, str):
        return str.__str__(value)
    if issubclass(kind, int):
        return int.__index__(value)
    if issubclass(kind, float):
        return float.__float__(value)
    if issubclass(kind, dict):
        out = {}
        for key, item in dict.items(value):
            if not issubclass(type(key), str):
                raise TypeError("llm_query's schema must have str keys")
            out[str.__str__(key)] = _plain(item, depth + 1)
        return out
    if issubclass(kind, list):
        return [_plain(item, depth + 1) for item in list.__iter__(value)]
    if issubclass(kind, tuple):
        return [_plain(item, depth + 1) for item in tuple.__iter__(value)]
    raise TypeError(f"llm_query's schema must be plain JSON data, not {type(value).__name__}")


def _refused_keyword(node: Any, depth: int = 0) -> str | None:
    if depth > 64:
        return "nesting deeper than 64 levels"
    if isinstance(node, dict):
        for key, value in node.items():
            # The keywords hold a str (pattern) or a dict of patterns; a property that
            # happens to be named "pattern" holds a schema dict and is allowed.
            if key == "pattern" and isinstance(value, str):
                return key
            if key == "patternProperties" and isinstance(value, dict):
                return key
            # Only references inside the schema itself: nothing is fetched.
            if key in ("$ref", "$dynamicRef") and isinstance(value, str) and not value.startswith("#"):
                return f"{key} to {value[:40]!r}"
            found = _refused_keyword(value, depth + 1)
            if found:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _refused_keyword(item, depth + 1)
            if found:
                return found
    return None


def _messages(prompt: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _response_format(schema: Schema) -> dict[str, Any]:
    return {
        "type": "json_schema",
        # Not strict: strict mode accepts only a subset of JSON Schema, and the reply is
        # validated here anyway.
        "json_schema": {"name": schema.name, "schema": schema.json_schema, "strict": False},
    }


def _rejects_format(exc: LLMError) -> bool:
    text = str(exc).lower()
    return exc.status in (400, 422) and ("response_format" in text or "json_schema" in text)


def _root_is_object(schema: Schema) -> bool:
    return schema.json_schema.get("type") == "object"


def _check(schema: Schema, text: str) -> tuple[bool, Any, tuple[SchemaIssue, ...]]:
    try:
        value = parse_json_text(text)
    except ValueError:
        # A plain-text reply is still right for a string schema.
        plain = schema.validate(text)
        if plain.ok:
            return True, plain.output, ()
        return False, None, (SchemaIssue("$", "a JSON value", repr(text[:60]) + ("..." if len(text) > 60 else "")),)
    result = schema.validate(value)
    return result.ok, result.output, result.issues


async def structured_query(
    send: Send,
    prompt: str | Sequence[Mapping[str, Any]],
    schema: Schema,
    params: Mapping[str, Any],
    client: Any,
) -> Any:
    """Ask one prompt for a value matching ``schema``; return the validated value.

    ``send(messages, params)`` makes one model call and returns its text (raising
    ``LLMError``); ``client`` keys the memory of whether the endpoint takes
    ``response_format``. Raises ``SchemaMismatchError`` when the reply (and the
    re-ask's) does not match, or the call's own ``LLMError``.
    """
    if "response_format" in params:
        raise TypeError("pass either schema= or response_format= to llm_query, not both")
    kind = _root_is_object(schema)
    known = _native.setdefault(client, {}) if client is not None else {}
    messages = _messages(prompt)
    native = known.get(kind, True)
    body_params = dict(params)
    text: str | None = None
    if native:
        try:
            text = await send(messages, {**body_params, "response_format": _response_format(schema)})
        except LLMError as exc:
            if not _rejects_format(exc):
                raise
            known[kind] = False
            native = False
        else:
            known[kind] = True
    if native:
        body_params["response_format"] = _response_format(schema)
    else:
        instructions = prompts.STRUCTURED_INSTRUCTIONS.format(schema=schema.prompt_text())
        messages = [{"role": "system", "content": instructions}, *messages]
        text = await send(messages, body_params)
    assert text is not None
    for attempt in range(REASKS + 1):
        ok, output, issues = _check(schema, text)
        if ok:
            return output
        if attempt == REASKS:
            break
        fix = prompts.STRUCTURED_RETRY.format(issues=format_issues(issues, budget=1_000))
        messages = [*messages, {"role": "assistant", "content": text},
                    {"role": "user", "content": fix}]
        text = await send(messages, body_params)
    shown = "; ".join(str(i) for i in issues[:3])
    raise SchemaMismatchError(f"the reply does not match the schema: {shown}")


async def structured_batch(
    send: Send,
    prompts_: Sequence[str | Sequence[Mapping[str, Any]]],
    schema: Schema,
    params: Mapping[str, Any],
    client: Any,
    on_item_done: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """``structured_query`` for many prompts at once, in order; a failed slot holds its
    exception (the caller turns it into its error text).

    When the client's support for ``response_format`` is not known yet, the first
    prompt goes alone, so a server that rejects it costs one extra request, not one
    per prompt.
    """
    total = len(prompts_)
    results: list[Any] = [None] * total
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        try:
            results[i] = await structured_query(send, prompts_[i], schema, params, client)
        except Exception as exc:  # noqa: BLE001 - kept in its slot, nothing is lost
            results[i] = exc
        done += 1
        if on_item_done is not None:
            on_item_done(done, total)

    if not total:
        return results
    start = 0
    if client is None or _root_is_object(schema) not in _native.get(client, {}):
        await one(0)
        start = 1
    await asyncio.gather(*(one(i) for i in range(start, total)))
    return results
