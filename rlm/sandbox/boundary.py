"""Host functions as cell code sees them: plain data in, no host frames out.

The executors hand ``build_namespace`` host functions (the llm_query family, tools).
Each is wrapped here before cell code can reach it:

- The llm_query family receives its prompts and parameters as copies in exact
  builtin types (``rlm.sandbox.plaindata``), converted on the cell's thread while the
  cell's deadline applies, so none of the cell's objects (a ``dict`` subclass with a
  slow ``items()``, a ``str`` subclass with lying methods) ever reaches the sub-query
  service or the engine thread.
- An async host function returns a ``SandboxCoroutine`` instead of its coroutine, made
  only when the cell awaits it (``deferred``: one never awaited leaves no warning). The
  coroutine's frame (its locals, the host module's globals) is what ``cr_frame`` would
  reach; the wrapper only lets ``await`` drive it and has no attribute leading inside.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any

from rlm.sandbox.subqueries import check_subquery_params, check_subquery_prompt

__all__ = ["LLM_FUNCTIONS", "SandboxCoroutine", "deferred", "guard_host_function"]

# Names of the functions whose arguments are prompts and request parameters.
_SINGLE = frozenset({"llm_query", "llm_query_async"})
_BATCH = frozenset({"llm_query_batch", "llm_query_batch_async"})
LLM_FUNCTIONS = _SINGLE | _BATCH


class SandboxCoroutine:
    """An awaitable that runs a host coroutine; nothing else can be done with it.

    ``await`` calls ``__await__`` (a dunder cell code cannot name), which hands the
    interpreter the coroutine's own iterator. There is no ``send``/``throw``, no frame
    and no public attribute, so the host coroutine's internals stay out of reach.
    """

    __slots__ = ("_coro",)

    def __init__(self, coro: Awaitable[Any]) -> None:
        self._coro = coro

    def __await__(self) -> Generator[Any, None, Any]:
        return self._coro.__await__()

    def __repr__(self) -> str:
        return "<coroutine (sandboxed)>"


class _Deferred:
    """An awaitable that makes its coroutine when awaited (and can be awaited once)."""

    __slots__ = ("_call",)

    def __init__(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._call: tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]] | None = (
            fn, args, kwargs,
        )

    def __await__(self) -> Any:
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError("cannot reuse already awaited coroutine")
        fn, args, kwargs = call
        return fn(*args, **kwargs).__await__()


def deferred(fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> SandboxCoroutine:
    """What a cell gets for the coroutine ``fn(*args, **kwargs)``: it is made when first awaited.

    Until then only the function and its arguments are held, so a cell that never awaits
    it leaves no coroutine to warn about; once awaited it behaves as the coroutine does.
    """
    return SandboxCoroutine(_Deferred(fn, args, kwargs))


def guard_host_function(
    name: str, fn: Callable[..., Any], drain: Callable[[Iterable[Any]], list[Any]] = list
) -> Callable[..., Any]:
    """``fn`` as cell code may call it under ``name``; other values are returned unchanged.

    The llm_query family gets its arguments as plain data (``drain`` materialises a
    batch's iterable with the cell's deadline checks); async functions hand back a
    ``SandboxCoroutine``. The wrapper is a plain function with ``fn``'s name, so code
    sees the same repr and signature errors as before.
    """
    if not callable(fn):
        return fn
    is_async = inspect.iscoroutinefunction(fn)
    # The arguments are checked at the call; an async function's coroutine is made only
    # when the cell awaits it (``deferred``), so one never awaited leaves no warning.
    call: Callable[..., Any]
    if name in _SINGLE:

        def call(prompt: Any, **params: Any) -> Any:
            prompt, params = check_subquery_prompt(prompt), check_subquery_params(params)
            return deferred(fn, prompt, **params) if is_async else fn(prompt, **params)

    elif name in _BATCH:

        def call(prompts: Any, **params: Any) -> Any:
            prompts, params = _plain_prompts(prompts, drain), check_subquery_params(params)
            return deferred(fn, prompts, **params) if is_async else fn(prompts, **params)

    elif is_async:

        def call(*args: Any, **kwargs: Any) -> Any:
            return deferred(fn, *args, **kwargs)

    else:
        call = fn
    if call is fn:
        return fn

    @functools.wraps(fn, assigned=("__name__", "__qualname__", "__doc__"), updated=())
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    # functools.wraps records the host function; cell code must not find it there.
    del wrapper.__wrapped__
    return wrapper


def _plain_prompts(prompts: Any, drain: Callable[[Iterable[Any]], list[Any]]) -> list[Any]:
    if issubclass(type(prompts), (str, bytes)) or not isinstance(prompts, Iterable):
        raise TypeError("llm_query_batch takes a list of prompts (str), e.g. llm_query_batch([a, b])")
    items = drain(prompts)
    if all(type(p) is str for p in items):  # the common case: nothing to convert
        return items
    return [check_subquery_prompt(p) for p in items]
