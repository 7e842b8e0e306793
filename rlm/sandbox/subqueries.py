"""The sandbox side of the llm_query family: what a prompt and its parameters may be.

Both executors check prompts and parameters here before anything is handed to the
host's sub-query service, count failed batch slots, and raise ``LLMQueryError`` (a
name cell code can catch) for a failed single query.
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "FAILED_SLOT_PREFIX",
    "SUBQUERY_PARAMS",
    "LLMQueryError",
    "check_subquery_params",
    "check_subquery_prompt",
    "count_failed_slots",
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


def _json_like(value: Any, depth: int = 0) -> bool:
    if depth > 20:
        return False
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return builtins.all(_json_like(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return builtins.all(
            isinstance(k, str) and _json_like(v, depth + 1) for k, v in value.items()
        )
    return False


def check_subquery_prompt(prompt: Any) -> None:
    """Raise TypeError unless ``prompt`` is a str or a list of chat-message dicts."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and builtins.all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and _json_like(m) for m in prompt
    ):
        return
    raise TypeError(
        "a prompt must be a str (or a list of {'role': ..., 'content': ...} messages), not "
        f"{type(prompt).__name__}; convert it with str(...) first"
    )


def check_subquery_params(params: dict[str, Any]) -> None:
    """Raise TypeError for a parameter outside SUBQUERY_PARAMS or a non-JSON value."""
    for key, value in params.items():
        if key not in SUBQUERY_PARAMS:
            allowed = ", ".join(sorted(SUBQUERY_PARAMS))
            raise TypeError(f"llm_query got an unsupported parameter {key!r}; allowed: {allowed}")
        if key in CLIENT_PARAMS and not isinstance(value, CLIENT_PARAMS[key]):
            raise TypeError(
                f"llm_query parameter {key!r} must be a {CLIENT_PARAMS[key].__name__} "
                f"(cache=False asks the model afresh), not {type(value).__name__}"
            )
        if not _json_like(value):
            raise TypeError(f"llm_query parameter {key!r} must be plain data (str, number, list, dict)")


def count_failed_slots(results: list[Any]) -> int:
    """How many items of an llm_query_batch result are ``[llm_query error: ...]`` strings."""
    return builtins.sum(
        1 for r in results if isinstance(r, str) and r.startswith(FAILED_SLOT_PREFIX)
    )

