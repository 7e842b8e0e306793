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
``patternProperties``) that would run a pattern of the code's choosing in the host,
with references only to JSON pointers inside the schema (no anchors, no nested ``$id``,
so that ``rlm.schema_bounds`` can see every reference), and with a checking cost that is
not exponential. Accepting a schema and validating replies both run in the validation
threads (``acheck_subquery_schema``, ``off_loop``): the engine loop that every sub-query
shares is never held by them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from rlm import prompts
from rlm.errors import ConfigError, LLMError, ResponseError
from rlm.schema import Schema, SchemaIssue, format_issues, parse_json_text
from rlm.schema_bounds import off_loop

__all__ = [
    "MAX_SCHEMA_CHARS",
    "SchemaMismatchError",
    "acheck_subquery_schema",
    "check_subquery_schema",
    "structured_batch",
    "structured_query",
]

# A schema is a description, not data: 64 KB of JSON is far more than any real one.
MAX_SCHEMA_CHARS = 64_000
# Re-asks after a reply that does not match (the model sees the issues each time).
REASKS = 1
# Replies validated in one hop to a validation thread in a large batch.
VALIDATE_CHUNK = 64
# Accepted schemas kept by their JSON text: a batch or a run reuses one schema many times,
# and accepting a large one costs a noticeable fraction of a second.
_ACCEPTED_KEPT = 64
_accepted: OrderedDict[str, Schema] = OrderedDict()
_accepted_lock = threading.Lock()
# Keywords that move a reference's base or give it a name other than a JSON pointer:
# references must stay plain pointers, so that the cost analysis sees each one.
_NAMING_KEYWORDS = ("$anchor", "$dynamicAnchor", "$dynamicRef", "$recursiveRef", "$recursiveAnchor")

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
    (their regular expressions would run in the host), ``$ref`` to anything but a JSON
    pointer inside the schema, anchors and nested ``$id``, and a schema whose checking
    could take exponential time. Blocking (accepting a large schema takes a moment): on
    an event loop, await ``acheck_subquery_schema``.
    """
    return _accept(_copy(schema))


async def acheck_subquery_schema(schema: Any) -> Schema:
    """``check_subquery_schema`` with the costly part in a validation thread.

    The schema is copied to plain data here, on the calling loop (reading a cell's
    object from another thread could race the cell); that copy is bounded in size.
    """
    return await off_loop(_accept, _copy(schema))


def _copy(schema: Any) -> Any:
    if not issubclass(type(schema), dict):
        raise TypeError(
            f"llm_query's schema must be a JSON Schema dict such as "
            f"{{'type': 'array', 'items': {{'type': 'string'}}}}, not {type(schema).__name__}"
        )
    return _plain(schema, [0])


def _accept(schema: Any) -> Schema:
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"llm_query's schema must be plain JSON data: {exc}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise TypeError(f"llm_query's schema is {len(text):,} characters of JSON; the limit is {MAX_SCHEMA_CHARS:,}")
    key = json.dumps(schema, sort_keys=True)
    with _accepted_lock:
        known = _accepted.get(key)
        if known is not None:
            _accepted.move_to_end(key)
            return known
    found = _refused_keyword(schema)
    if found:
        raise TypeError(
            f"llm_query's schema uses {found}, which is not supported in sub-query schemas "
            "(regular expressions and outside references would run in the host); check "
            "such things in your code instead"
        )
    try:
        accepted = Schema.of(schema)
    except ConfigError as exc:
        raise TypeError(f"llm_query's schema: {exc}") from None
    with _accepted_lock:
        _accepted[key] = accepted
        while len(_accepted) > _ACCEPTED_KEPT:
            _accepted.popitem(last=False)
    return accepted


def _plain(value: Any, seen: list[int], depth: int = 0) -> Any:
    """A copy of JSON-like data made of exact builtin types, read without calling any
    method a subclass could override (from the in-process sandbox, a dict subclass's
    ``items`` would be cell code running on the host's engine loop). ``seen`` counts the
    values copied: each takes at least a character of JSON, so the copy stops early."""
    if depth > 64:
        raise TypeError("llm_query's schema is nested deeper than 64 levels")
    seen[0] += 1
    if seen[0] > MAX_SCHEMA_CHARS:
        raise TypeError(f"llm_query's schema holds more than {MAX_SCHEMA_CHARS:,} values; the limit is "
                        f"{MAX_SCHEMA_CHARS:,} characters of JSON")
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
            out[str.__str__(key)] = _plain(item, seen, depth + 1)
        return out
    if issubclass(kind, list):
        return [_plain(item, seen, depth + 1) for item in list.__iter__(value)]
    if issubclass(kind, tuple):
        return [_plain(item, seen, depth + 1) for item in tuple.__iter__(value)]
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
            # Only JSON pointers inside the schema itself: nothing is fetched, and the
            # cost analysis follows every reference.
            if key == "$ref" and isinstance(value, str) and not (value == "#" or value.startswith("#/")):
                return f"{key} to {value[:40]!r}"
            if key in _NAMING_KEYWORDS and isinstance(value, str | bool):
                return key
            if key == "$id" and depth and isinstance(value, str):
                return "a nested $id"
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


def _check_all(schema: Schema, texts: list[str]) -> list[tuple[bool, Any, tuple[SchemaIssue, ...]]]:
    return [_check(schema, text) for text in texts]


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
    send: Send, schema: Schema, messages: list[dict[str, Any]], body_params: dict[str, Any], text: str,
    checked: tuple[bool, Any, tuple[SchemaIssue, ...]] | None = None,
) -> Any:
    """The validated value of a reply, re-asking with the issues while re-asks remain
    (``checked``: the reply's verdict, when it was already validated)."""
    for attempt in range(REASKS + 1):
        ok, output, issues = checked or await off_loop(_check, schema, text)
        checked = None
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

    async def settle(i: int, messages: list[dict[str, Any]], reply: Any,
                     checked: tuple[bool, Any, tuple[SchemaIssue, ...]] | None) -> None:
        try:
            if isinstance(reply, LLMError) and native and _rejects_format(reply):
                # The server changed its mind (or another client's probe raced this one).
                known[kind] = False
                results[i] = await structured_query(send, prompts_[i], schema, params, client)
            elif isinstance(reply, BaseException):
                results[i] = reply
            else:
                results[i] = await _settle(send, schema, messages, body_params, reply, checked)
        except Exception as exc:  # noqa: BLE001 - kept in its slot, nothing is lost
            results[i] = exc

    # Most replies match: validate them in chunks, one hop to a validation thread each.
    texts = [(offset, reply) for offset, reply in enumerate(replies) if isinstance(reply, str)]
    verdicts: dict[int, tuple[bool, Any, tuple[SchemaIssue, ...]]] = {}
    for first in range(0, len(texts), VALIDATE_CHUNK):
        chunk = texts[first:first + VALIDATE_CHUNK]
        done = await off_loop(_check_all, schema, [reply for _, reply in chunk])
        verdicts.update(zip((offset for offset, _ in chunk), done, strict=True))
    pending = []
    for offset, ((messages, _), reply) in enumerate(zip(prepared, replies, strict=True)):
        verdict = verdicts.get(offset)
        if verdict is not None and verdict[0]:
            results[start + offset] = verdict[1]
            continue
        pending.append(settle(start + offset, messages, reply, verdict))
    if pending:
        await asyncio.gather(*pending)
    return results
