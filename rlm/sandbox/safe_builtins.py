"""The builtins of a sandbox namespace: a curated set, with deadline-aware consumers.

Builtins that drain iterators in C (sum, min, max, sorted, list, tuple, set,
frozenset, dict, any, all, iter(f, sentinel)) take their input in chunks with a
deadline check in between, so ``sum(itertools.count())`` stops at the deadline.
``type`` and the container types are stand-ins that behave like the real ones for
isinstance, subclassing and comparisons but cannot create classes dynamically.
Builtins that would reach files, the interpreter or the namespace itself (open,
exec, eval, globals, ...) are replaced by functions that say why they are absent.

A namespace's deadline is its ``STOP_FLAG`` entry; when it is set, the namespace's
``TIMEOUT_HOOK`` raises CellTimeout (both installed by ``rlm.sandbox.cells``).
"""

from __future__ import annotations

import builtins
import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rlm.sandbox.asyncio_facade import deferred
from rlm.sandbox.compiler import STOP_FLAG, TIMEOUT_HOOK
from rlm.sandbox.guards import (
    MISSING,
    getattr_guard,
    guarded_delattr,
    guarded_getattr,
    guarded_hasattr,
    guarded_setattr,
)
from rlm.sandbox.jail_files import jail_open
from rlm.sandbox.subqueries import LLMQueryError

__all__ = ["builtin_standins", "checked_iter", "chunks", "make_builtins"]

# Items consumed per deadline check when a wrapped builtin drains an iterator.
_CHUNK = 4096


def check_stop(ns: dict[str, Any]) -> None:
    """Raise CellTimeout (through the namespace's hook) if the running cell must stop."""
    if ns[STOP_FLAG]:
        ns[TIMEOUT_HOOK]()


# Types whose contents are already in memory: consuming them is bounded by their size,
# so wrapped builtins hand them straight to C. ``range`` is not among them.
_MATERIALIZED = frozenset(
    {list, tuple, str, bytes, bytearray, dict, set, frozenset, collections.deque,
     type({}.keys()), type({}.values()), type({}.items())}
)  # fmt: skip

_real_list, _real_tuple, _real_set, _real_frozenset, _real_dict = list, tuple, set, frozenset, dict
_real_type = type


def _drain(ns: dict[str, Any], iterable: Iterable[Any]) -> list[Any]:
    """Materialise an iterable in chunks, checking the deadline between chunks."""
    if type(iterable) in _MATERIALIZED:
        return _real_list(iterable)
    out: list[Any] = []
    it = iter(iterable)
    islice = itertools.islice
    while True:
        before = len(out)
        out.extend(islice(it, _CHUNK))
        if len(out) - before < _CHUNK:
            return out
        check_stop(ns)


def chunks(ns: dict[str, Any], iterable: Iterable[Any]) -> Iterator[list[Any]]:
    if type(iterable) in _MATERIALIZED:
        yield iterable  # type: ignore[misc]
        return
    it = iter(iterable)
    islice = itertools.islice
    while True:
        chunk = _real_list(islice(it, _CHUNK))
        if not chunk:
            return
        yield chunk
        check_stop(ns)


class _ConsumingType:
    """Stands in for list/tuple/set/frozenset/dict in the sandbox's builtins.

    Calling it drains the argument in chunks with deadline checks (``list(count())``
    stops at the deadline); isinstance, issubclass, subclassing (via
    ``__mro_entries__``), ``list[int]``, ``==`` and class attributes behave like the
    real type, and ``type(x)`` in the sandbox returns this stand-in for real ones.
    """

    __slots__ = ("_real", "_ns")

    def __init__(self, real: type, ns: dict[str, Any]) -> None:
        self._real = real
        self._ns = ns

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        real = self._real
        if not args or type(args[0]) in _MATERIALIZED or len(args) > 1:
            return real(*args, **kwargs)
        src = args[0]
        if real is _real_dict:
            if hasattr(src, "keys"):
                return real(src, **kwargs)
            out: dict[Any, Any] = {}
            for chunk in chunks(self._ns, src):
                out.update(chunk)
            out.update(kwargs)
            return out
        if real is _real_set or real is _real_frozenset:
            acc: set[Any] = set()
            for chunk in chunks(self._ns, src):
                acc.update(chunk)
            return acc if real is _real_set else frozenset(acc)
        items = _drain(self._ns, src)
        return items if real is _real_list else real(items, **kwargs)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._real)

    def __subclasscheck__(self, cls: Any) -> bool:
        return issubclass(cls, self._real)

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (self._real,)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") and name not in ("__name__", "__qualname__"):
            raise AttributeError(name)
        # The real type's attributes, judged like any other attribute read.
        return getattr_guard(self._real, name)

    def __getitem__(self, item: Any) -> Any:
        return self._real[item]  # type: ignore[index]

    def __or__(self, other: Any) -> Any:
        return self._real | (other._real if isinstance(other, _ConsumingType) else other)

    def __ror__(self, other: Any) -> Any:
        return (other._real if isinstance(other, _ConsumingType) else other) | self._real

    def __eq__(self, other: Any) -> bool:
        return other is self or other is self._real or (
            isinstance(other, _ConsumingType) and other._real is self._real
        )

    def __hash__(self) -> int:
        return hash(self._real)

    def __repr__(self) -> str:
        return repr(self._real)


class _TypeView:
    """``type`` in the sandbox: one-argument form only; metaclasses are not callable.

    ``type(name, bases, dict)`` (and calling a metaclass obtained through ``type(C)``)
    would create classes with arbitrary dunder methods, which the class statement
    refuses; ``isinstance(C, type)`` and comparisons still work.
    """

    __slots__ = ("_real", "_views")

    def __init__(self, real: type, views: dict[type, Any]) -> None:
        self._real = real
        self._views = views

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._real is not _real_type or len(args) != 1 or kwargs:
            raise TypeError(
                "creating classes by calling type() or a metaclass is not allowed in the "
                "sandbox; use a class statement (type(x) with one argument works)"
            )
        if isinstance(args[0], (_TypeView, _ConsumingType)):
            return self._views[_real_type]  # these stand in for classes: their type is type
        cls = _real_type(args[0])
        view = self._views.get(cls)
        if view is not None:
            return view
        if issubclass(cls, _real_type):
            view = _TypeView(cls, self._views)
            self._views[cls] = view
            return view
        return cls

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._real)

    def __subclasscheck__(self, cls: Any) -> bool:
        return issubclass(cls, self._real)

    def __getattr__(self, name: str) -> Any:
        # Only the names: a metaclass's methods act on every class of its kind, shared
        # with the host (ABCMeta.register(Mapping, bytes) would make bytes a Mapping
        # host-wide), and type's own make classes with any dunder.
        if name in ("__name__", "__qualname__"):
            return getattr(self._real, name)
        raise AttributeError(
            f"attribute {name!r} of the metaclass {self._real.__name__!r} is not accessible in "
            "the sandbox"
        )

    def __eq__(self, other: Any) -> bool:
        return other is self or other is self._real

    def __hash__(self) -> int:
        return hash(self._real)

    def __repr__(self) -> str:
        return repr(self._real)


def _unavailable(name: str, why: str) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise NameError(f"{name}() is not available in the sandbox: {why}")

    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable


_ABSENT = {
    "open": (
        "there is no file access here (only sandbox='process' with its filesystem jail "
        "active gives open() a private scratch directory); the data is in `context`, and "
        "io.StringIO makes an in-memory file"
    ),
    "exec": "write the code directly in the cell",
    "eval": "write the expression directly in the cell",
    "compile": "write the code directly in the cell",
    "globals": "refer to variables by name",
    "locals": "refer to variables by name",
    "vars": "use getattr() or the object's own attributes",
    "input": "there is no interactive input; the data is in `context`",
    "breakpoint": "there is no debugger",
    "help": "there is no interactive help",
    "exit": "to finish, call FINAL(answer)",
    "quit": "to finish, call FINAL(answer)",
    "memoryview": "use bytes or bytearray",
}

_EXCEPTIONS = [
    "ArithmeticError", "AssertionError", "AttributeError", "BaseException",
    "BaseExceptionGroup", "BufferError", "EOFError", "Exception", "ExceptionGroup",
    "FloatingPointError", "GeneratorExit", "ImportError", "IndexError", "KeyError",
    "KeyboardInterrupt", "LookupError", "MemoryError", "ModuleNotFoundError", "NameError",
    "NotImplementedError", "OSError", "OverflowError", "RecursionError", "ReferenceError",
    "RuntimeError", "StopAsyncIteration", "StopIteration", "SystemExit", "TimeoutError",
    "TypeError", "UnboundLocalError", "UnicodeDecodeError", "UnicodeEncodeError",
    "UnicodeError", "ValueError", "ZeroDivisionError", "Warning", "UserWarning",
    "DeprecationWarning", "RuntimeWarning",
]  # fmt: skip

_PLAIN_BUILTINS = [
    "abs", "aiter", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "classmethod", "complex", "divmod", "enumerate", "filter", "float", "format", "hash",
    "hex", "id", "int", "isinstance", "issubclass", "len", "map", "next", "object", "oct",
    "ord", "pow", "property", "range", "repr", "reversed", "round", "slice", "staticmethod",
    "str", "super", "zip", "Ellipsis", "NotImplemented", "False", "True", "None",
]  # fmt: skip


def make_builtins(
    ns: dict[str, Any], importer: Callable[..., Any], *, file_access: bool = False
) -> dict[str, Any]:
    """The builtins of one namespace. ``file_access`` gives cells ``open`` by file name: only
    for a worker process confined to a private directory (its jail, not the policy, is
    what bounds the files it can reach)."""
    b: dict[str, Any] = {name: getattr(builtins, name) for name in _PLAIN_BUILTINS}
    b.update({name: getattr(builtins, name) for name in _EXCEPTIONS if hasattr(builtins, name)})
    b["LLMQueryError"] = LLMQueryError
    b["__build_class__"] = builtins.__build_class__
    b["__import__"] = importer
    for name, why in _ABSENT.items():
        b[name] = _unavailable(name, why)
    if file_access:
        # File names only: a descriptor number could reach the worker's own channel.
        b["open"] = jail_open

    views: dict[type, Any] = {}
    for real in (list, tuple, set, frozenset, dict):
        views[real] = b[real.__name__] = _ConsumingType(real, ns)
    type_view = _TypeView(_real_type, views)
    views[_real_type] = b["type"] = type_view

    def check() -> None:
        if ns[STOP_FLAG]:
            ns[TIMEOUT_HOOK]()

    def sum(iterable: Iterable[Any], /, start: Any = 0) -> Any:  # noqa: A001
        total = start
        for chunk in chunks(ns, iterable):
            total = builtins.sum(chunk, total)
        return total

    def _extreme(pick: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 1:
            return pick(*args, **kwargs)
        key = kwargs.get("key")
        default = kwargs.get("default", MISSING)
        best: list[Any] = []
        for chunk in chunks(ns, args[0]):
            if chunk:
                best.append(pick(chunk, key=key))
        if not best:
            if default is MISSING:
                raise ValueError(f"{pick.__name__}() iterable argument is empty")
            return default
        return pick(best, key=key)

    def min(*args: Any, **kwargs: Any) -> Any:  # noqa: A001
        return _extreme(builtins.min, args, kwargs)

    def max(*args: Any, **kwargs: Any) -> Any:  # noqa: A001
        return _extreme(builtins.max, args, kwargs)

    def sorted(iterable: Iterable[Any], /, *, key: Any = None, reverse: bool = False) -> list[Any]:  # noqa: A001
        return builtins.sorted(_drain(ns, iterable), key=key, reverse=reverse)

    def any(iterable: Iterable[Any], /) -> bool:  # noqa: A001
        if type(iterable) in _MATERIALIZED:
            return builtins.any(iterable)
        n = 0
        for item in iterable:
            n += 1
            if not n & 1023:
                check()
            if item:
                return True
        return False

    def all(iterable: Iterable[Any], /) -> bool:  # noqa: A001
        if type(iterable) in _MATERIALIZED:
            return builtins.all(iterable)
        n = 0
        for item in iterable:
            n += 1
            if not n & 1023:
                check()
            if not item:
                return False
        return True

    def iter(obj: Any, *sentinel: Any) -> Any:  # noqa: A001
        if not sentinel:
            return builtins.iter(obj)
        return checked_iter(ns, builtins.iter(obj, *sentinel))

    def anext(iterator: Any, *default: Any) -> Any:  # noqa: A001
        # A coroutine rather than the raw awaitable: the raw one is iterable and would
        # hand out the event loop's futures to a plain ``for`` loop.
        # (Wrapped: the coroutine's frame would be reachable through it otherwise.)
        async def step() -> Any:
            if default:
                return await builtins.anext(iterator, *default)
            return await builtins.anext(iterator)

        return deferred(step)

    def dir(*args: Any) -> list[str]:  # noqa: A001
        if not args:
            return builtins.sorted(k for k in ns if not k.startswith("_"))
        return [n for n in builtins.dir(args[0]) if not n.startswith("_")]

    b.update(
        sum=sum, min=min, max=max, sorted=sorted, any=any, all=all, iter=iter, anext=anext,
        dir=dir, getattr=guarded_getattr, hasattr=guarded_hasattr, setattr=guarded_setattr,
        delattr=guarded_delattr,
    )
    return b



class _CheckedIterator:
    """An iterator that checks the cell's deadline before each item.

    A class rather than a generator: a generator made here would carry a frame of this
    module (``gi_frame.f_globals``), and cell code holds these iterators.
    """

    __slots__ = ("_it", "_ns")

    def __init__(self, ns: dict[str, Any], it: Iterator[Any]) -> None:
        self._ns = ns
        self._it = it

    def __iter__(self) -> _CheckedIterator:
        return self

    def __next__(self) -> Any:
        if self._ns[STOP_FLAG]:
            self._ns[TIMEOUT_HOOK]()
        return next(self._it)

    def __repr__(self) -> str:
        return "<iterator>"


def checked_iter(ns: dict[str, Any], it: Iterator[Any]) -> Iterator[Any]:
    """``it`` with a deadline check before each item (for iterators that may not end)."""
    return _CheckedIterator(ns, it)



def builtin_standins(b: dict[str, Any]) -> dict[int, type]:
    """``id()`` of each stand-in in a builtins dict made by ``make_builtins`` -> its real type.

    For hooks that must see through the stand-ins (a ``case list(...)`` pattern needs
    the real class); the dict keeps nothing alive, the builtins dict does.
    """
    # Not ``type``: its stand-in exists so that the real one is never handed out.
    return {id(b[real.__name__]): real for real in (list, tuple, set, frozenset, dict)}
