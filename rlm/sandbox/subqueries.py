"""The sandbox side of the llm_query family: what a prompt and its parameters may be.

Both executors check prompts and parameters here before anything is handed to the
host's sub-query service, count failed batch slots, and raise ``LLMQueryError`` (a
name cell code can catch) for a failed single query.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any

from rlm.errors import LLMError
from rlm.sandbox.plaindata import PlainDataError, exact_str, to_plain_data

__all__ = [
    "FAILED_SLOT_PREFIX",
    "SUBQUERY_PARAMS",
    "LLMQueryError",
    "check_subquery_params",
    "check_subquery_prompt",
    "count_failed_slots",
    "prompt_list",
    "query_error_text",
]


class LLMQueryError(Exception):
    """A sub-query from ``llm_query`` failed; visible to cell code so it can be caught."""


# Request parameters code may pass to llm_query & co. They go into the request body; the
# list keeps out anything the client itself would interpret (callbacks, return_exceptions,
# transport options), whatever a given SubQueries implementation does with them.
# ``schema`` (a JSON Schema dict) is taken out by the host's service, which asks for and
# validates a structured reply (rlm/structured.py); it never reaches the request as is.
SUBQUERY_PARAMS = frozenset(
    {"model", "temperature", "max_tokens", "max_completion_tokens", "top_p", "stop", "seed",
     "presence_penalty", "frequency_penalty", "response_format", "reasoning_effort",
     "logit_bias", "n", "schema", "cache"}
)  # fmt: skip
# Parameters the host's client interprets itself rather than sending: their value type.
CLIENT_PARAMS: dict[str, type] = {"cache": bool}

FAILED_SLOT_PREFIX = "[llm_query error: "


def check_subquery_prompt(prompt: Any) -> str | list[dict[str, Any]]:
    """Return ``prompt`` as plain data, or raise TypeError if it is not a prompt.

    A prompt is a str or a non-empty list of chat-message dicts (each with a str
    ``role``), made of plain data. The result is a copy in exact builtin types (see
    ``rlm.sandbox.plaindata``), so nothing of the cell's objects reaches the host's
    sub-query service or the engine thread.
    """
    if type(prompt) is str:  # the common case, first
        return prompt
    if issubclass(type(prompt), str):
        return exact_str(prompt)
    try:
        plain = to_plain_data(prompt) if isinstance(prompt, list) else None
    except PlainDataError:
        plain = None
    if plain and builtins.all(type(m) is dict and type(m.get("role")) is str for m in plain):
        return plain
    raise TypeError(
        "a prompt must be a str (or a list of {'role': ..., 'content': ...} messages), not "
        f"{type(prompt).__name__}; convert it with str(...) first"
    )


def check_subquery_params(params: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` as plain data; raise TypeError for an unknown name or a non-JSON value.

    Names are judged as exact strings (a str subclass cannot pass for an allowed name)
    and values are copied into exact builtin types, like prompts.
    """
    out: dict[str, Any] = {}
    for key, value in list(dict.items(params)):
        name = exact_str(key, "parameter name")
        if name not in SUBQUERY_PARAMS:
            allowed = ", ".join(sorted(SUBQUERY_PARAMS))
            raise TypeError(f"llm_query got an unsupported parameter {name!r}; allowed: {allowed}")
        if name in CLIENT_PARAMS:
            kind = CLIENT_PARAMS[name]
            if type(value) is not kind:
                raise TypeError(
                    f"llm_query parameter {name!r} must be a {kind.__name__} "
                    f"(cache=False asks the model afresh), not {type(value).__name__}"
                )
            out[name] = kind(value)
            continue
        try:
            out[name] = to_plain_data(value, max_nodes=100_000)
        except PlainDataError:
            raise TypeError(
                f"llm_query parameter {name!r} must be plain data (str, number, list, dict)"
            ) from None
    return out


def count_failed_slots(results: list[Any]) -> int:
    """How many items of an llm_query_batch result are ``[llm_query error: ...]`` strings."""
    return builtins.sum(
        1 for r in results if isinstance(r, str) and r.startswith(FAILED_SLOT_PREFIX)
    )


def prompt_list(prompts: Any) -> list[Any]:
    """The prompts of an ``llm_query_batch`` call as a list, each checked; a lone str or
    a non-iterable raises ``TypeError`` with the call's right shape."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise TypeError("llm_query_batch takes a list of prompts (str), e.g. llm_query_batch([a, b])")
    items = list(prompts)
    for p in items:
        check_subquery_prompt(p)
    return items


def query_error_text(exc: BaseException) -> str:
    """What a cell's ``LLMQueryError`` says about a failed sub-query: the error's own
    text, capped at 300 characters."""
    if isinstance(exc, LLMQueryError):
        text = str(exc)
    elif isinstance(exc, LLMError):
        text = str(exc) or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
