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
# Replies validated between two yields to the event loop in a large batch.
VALIDATE_CHUNK = 64

Send = Callable[[list[dict[str, Any]], dict[str, Any]], Awaitable[str]]
# (messages of each prompt, body params, on_item_done) -> each slot's text or exception.
SendMany = Callable[
    [list[list[dict[str, Any]]], dict[str, Any], Callable[[int, int], None]],
    Awaitable[list[Any]],
]

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


def _prepare(
    prompt: str | Sequence[Mapping[str, Any]], schema: Schema, params: Mapping[str, Any], native: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and body parameters of a structured request, native or instructed."""
    messages = _messages(prompt)
    body_params = dict(params)
    if native:
        body_params["response_format"] = _response_format(schema)
    else:
        instructions = prompts.STRUCTURED_INSTRUCTIONS.format(schema=schema.prompt_text())
        messages = [{"role": "system", "content": instructions}, *messages]
    return messages, body_params


async def _settle(
    send: Send, schema: Schema, messages: list[dict[str, Any]], body_params: dict[str, Any], text: str
) -> Any:
    """The validated value of a reply, re-asking with the issues while re-asks remain."""
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


def _memory(client: Any) -> dict[bool, bool]:
    return _native.setdefault(client, {}) if client is not None else {}


def _check_params(params: Mapping[str, Any]) -> None:
    if "response_format" in params:
        raise TypeError("pass either schema= or response_format= to llm_query, not both")


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
    _check_params(params)
    kind = _root_is_object(schema)
    known = _memory(client)
    if known.get(kind, True):
        messages, body_params = _prepare(prompt, schema, params, native=True)
        try:
            text = await send(messages, body_params)
        except LLMError as exc:
            if not _rejects_format(exc):
                raise
            known[kind] = False
        else:
            known[kind] = True
            return await _settle(send, schema, messages, body_params, text)
    messages, body_params = _prepare(prompt, schema, params, native=False)
    text = await send(messages, body_params)
    return await _settle(send, schema, messages, body_params, text)


async def structured_batch(
    send: Send,
    send_many: SendMany,
    prompts_: Sequence[str | Sequence[Mapping[str, Any]]],
    schema: Schema,
    params: Mapping[str, Any],
    client: Any,
    on_item_done: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """``structured_query`` for many prompts at once, in order; a failed slot holds its
    exception (the caller turns it into its error text).

    ``send_many(messages_list, params)`` sends the batch in one go (the client's own
    batch path) and returns each slot's text or exception. When the client's support
    for ``response_format`` is not known yet, the first prompt goes alone, so a server
    that rejects it costs one extra request, not one per prompt. Re-asks go one by one.
    """
    _check_params(params)
    total = len(prompts_)
    results: list[Any] = [None] * total
    if not total:
        return results
    kind = _root_is_object(schema)
    known = _memory(client)
    start = 0
    if kind not in known:
        try:
            results[0] = await structured_query(send, prompts_[0], schema, params, client)
        except Exception as exc:  # noqa: BLE001 - kept in its slot, nothing is lost
            results[0] = exc
        start = 1
        if on_item_done is not None:
            on_item_done(1, total)
    native = known.get(kind, True)
    prepared = [_prepare(prompts_[i], schema, params, native) for i in range(start, total)]
    body_params = prepared[0][1] if prepared else dict(params)

    def progress(done: int, _sent: int) -> None:
        if on_item_done is not None:
            on_item_done(done + start, total)

    replies = await send_many([messages for messages, _ in prepared], body_params, progress)

    async def settle(i: int, messages: list[dict[str, Any]], reply: Any) -> None:
        try:
            if isinstance(reply, LLMError) and native and _rejects_format(reply):
                # The server changed its mind (or another client's probe raced this one).
                known[kind] = False
                results[i] = await structured_query(send, prompts_[i], schema, params, client)
            elif isinstance(reply, BaseException):
                results[i] = reply
            else:
                results[i] = await _settle(send, schema, messages, body_params, reply)
        except Exception as exc:  # noqa: BLE001 - kept in its slot, nothing is lost
            results[i] = exc

    pending = []
    for offset, ((messages, _), reply) in enumerate(zip(prepared, replies, strict=True)):
        i = start + offset
        if offset and offset % VALIDATE_CHUNK == 0:
            # Validation runs on the engine loop (tens of microseconds a reply): give
            # other requests their turn between chunks of a large batch.
            await asyncio.sleep(0)
        if isinstance(reply, str):
            # Most replies match: validate them here and await nothing for them.
            ok, output, _ = _check(schema, reply)
            if ok:
                results[i] = output
                continue
        pending.append(settle(i, messages, reply))
    if pending:
        await asyncio.gather(*pending)
    return results
