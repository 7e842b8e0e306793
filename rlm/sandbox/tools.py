"""The user's tools as cells see them: each one a plain closure under a checked name.

Both executors give cells the tools an RLM or REPLEnv was built with (``tools=``); this
module checks their names and wraps them so cell code cannot reach the callable's
``__self__`` or ``func``. It holds no execution and no policy beyond that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from rlm.errors import ConfigError

__all__ = ["RESERVED_NAMES", "wrap_tools"]

# Names the REPL itself provides: a tool may not hide them.
RESERVED_NAMES = frozenset({"context", "llm_query", "llm_query_batch", "llm_query_async",
                            "llm_query_batch_async", "FINAL", "FINAL_VAR"})


def wrap_tools(tools: Mapping[str, Any] | None) -> dict[str, Any]:
    """Each tool becomes a plain closure, so code cannot reach its ``__self__``/``func``;
    a name that is not a public identifier or is one of the REPL's own, or a tool that is
    not callable, raises ``ConfigError``."""
    out: dict[str, Any] = {}
    for name, tool in (tools or {}).items():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ConfigError(f"tool name {name!r} must be a public Python identifier")
        if name in RESERVED_NAMES:
            raise ConfigError(f"tool name {name!r} is reserved in the REPL; pick another name")
        if not callable(tool):
            raise ConfigError(f"tool {name!r} must be callable (a function)")
        out[name] = _wrap_tool(name, tool)
    return out


def _wrap_tool(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        async def async_tool(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs)

        async_tool.__name__ = async_tool.__qualname__ = name
        async_tool.__doc__ = getattr(fn, "__doc__", None)
        return async_tool

    def tool(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = getattr(fn, "__doc__", None)
    return tool
