"""The run-time guards of the sandbox policy: attribute reads and writes, and str.format.

Compiled code calls ``getattr_guard`` for every ``a.b`` it reads outside a few
everyday methods, ``write_guard`` before every ``a.b = v``, and ``augattr_guard`` for
``a.b += v``; the sandbox's ``getattr``, ``hasattr``, ``setattr``, ``delattr``,
``operator.attrgetter``/``methodcaller`` and ``str.format`` fields reach the same
rules. The name rules (``is_blocked_attr``) are shared with the compile-time check.

Objects defined in a cell carry ``CELL_MODULE`` as ``__module__``: that is how the
guards tell user objects (private attributes readable, attributes writable) from the
host's shared ones.
"""

from __future__ import annotations

import _string  # type: ignore[import-not-found]  # C helpers behind str.format's parser
import abc
import asyncio
import concurrent.futures
import decimal
import operator
import string as string_module
import textwrap
import threading
import types
from collections.abc import Callable
from typing import Any

__all__ = [
    "BLOCKED_ATTRIBUTES",
    "CELL_MODULE",
    "MISSING",
    "READABLE_DUNDERS",
    "SafeFormatter",
    "attr_writable",
    "augattr_guard",
    "getattr_guard",
    "guarded_delattr",
    "guarded_getattr",
    "guarded_hasattr",
    "guarded_setattr",
    "is_blocked_attr",
    "refuse_attr",
    "write_guard",
]

# ``__name__`` of every sandbox namespace: classes and functions defined by user code
# carry it as ``__module__``, which is how the write guard tells them apart from the
# host's (shared) classes and functions.
CELL_MODULE = "__rlm_cell__"

# A default-argument sentinel no caller can pass by accident.
MISSING: Any = object()

# Attribute names that reach interpreter internals (frames, code, tracebacks, the
# suspended state of generators and coroutines) or the class hierarchy. Checked at
# compile time for ``a.b`` and at run time for getattr()/hasattr()/format fields.
BLOCKED_ATTRIBUTES = frozenset(
    {
        "f_back", "f_builtins", "f_code", "f_globals", "f_locals", "f_trace",
        "f_generator", "f_lasti",
        "tb_frame", "tb_next", "tb_lasti",
        "gi_frame", "gi_code", "gi_yieldfrom", "gi_running", "gi_suspended",
        "cr_frame", "cr_code", "cr_await", "cr_origin", "cr_running", "cr_suspended",
        "ag_frame", "ag_code", "ag_await", "ag_running",
        "func_globals", "func_code", "func_closure", "func_defaults", "func_dict",
        "im_func", "im_self", "im_class",
        "mro",
    }
)  # fmt: skip

# Names that are harmless on most objects but not on some types; every compiled
# ``a.b`` goes through ``_getattr_``, which checks these against the object's type.
_TYPE_SENSITIVE = frozenset(
    {"format", "format_map", "obj", "register", "send", "throw", "asend", "athrow", "aclose"}
)

# Dunder attributes that only ever hold a str (or None) and that code needs for
# ``type(e).__name__``: readable, never writable.
# Dunders code may read: the str ones, and the protocol methods real models probe with
# hasattr(context, "__len__") (the bound method only: its __self__/__func__ stay blocked).
_STR_DUNDERS = frozenset({"__name__", "__qualname__", "__doc__"})
_PROTOCOL_DUNDERS = frozenset({"__len__", "__iter__", "__contains__", "__getitem__"})
READABLE_DUNDERS = _STR_DUNDERS | _PROTOCOL_DUNDERS
_BOUND_METHODS = (types.MethodWrapperType, types.BuiltinMethodType, types.MethodType)
# The public API of namedtuples, which happens to start with "_".
_NAMEDTUPLE_API = frozenset({"_asdict", "_replace", "_fields", "_make", "_field_defaults"})


def is_blocked_attr(name: str, write: bool = False) -> bool:
    """The name rules for attributes, before any look at the object.

    ``__x`` names are refused (except the readable str dunders, for reading); ``_x``
    names pass here and are then allowed only on objects defined in the REPL (and the
    namedtuple API); interpreter internals are refused.
    """
    if name.startswith("_"):
        if name.startswith("__"):
            return write or name not in READABLE_DUNDERS
        return False
    return name in BLOCKED_ATTRIBUTES or name.startswith("co_")



def refuse_attr(name: str) -> AttributeError:
    return AttributeError(
        f"attribute {name!r} is not accessible in the sandbox "
        "(names starting with '_' and interpreter internals are off limits)"
    )


def _is_user_class(cls: Any) -> bool:
    return isinstance(cls, type) and cls.__module__ == CELL_MODULE


_ASYNC_STEPPERS: tuple[type, ...] = (types.CoroutineType, types.AsyncGeneratorType)


def _probe_async_types() -> tuple[type, ...]:
    async def agen() -> Any:
        yield None

    gen = agen()
    asend = gen.asend(None)
    athrow = gen.athrow(GeneratorExit)
    kinds = (type(asend), type(athrow))
    asend.close()
    athrow.close()
    return kinds


_ASYNC_STEPPERS = _ASYNC_STEPPERS + _probe_async_types()

# Objects that must never be handed to user code. Nothing in the namespace leads to
# them; this is a second line in case something does (an attribute of one of these
# would reach the event loop, threads or the interpreter).
_DENY_TYPES = frozenset(
    {
        types.FrameType,
        types.CodeType,
        types.TracebackType,
        types.ModuleType,
        asyncio.Future,
        asyncio.Task,
        asyncio.Handle,
        asyncio.TimerHandle,
        asyncio.SelectorEventLoop,
        concurrent.futures.Future,
        threading.Thread,
    }
)


def _is_user_object(ob: Any) -> bool:
    """True for classes and functions defined in a cell, and instances of such classes."""
    cls = type(ob)
    if cls.__module__ == CELL_MODULE:
        return True
    if isinstance(ob, type) or cls is types.FunctionType:
        return ob.__module__ == CELL_MODULE
    return False


def _private_getattr(obj: Any, name: str) -> Any:
    if name in READABLE_DUNDERS:
        value = getattr(obj, name)
        if name in _STR_DUNDERS and (value is None or type(value) is str):
            return value
        if name in _PROTOCOL_DUNDERS and type(value) in _BOUND_METHODS:
            return value
        raise refuse_attr(name)
    if name in _NAMEDTUPLE_API and (
        isinstance(obj, tuple) or (isinstance(obj, type) and issubclass(obj, tuple))
    ):
        value = getattr(obj, name)
        # The class's own dict: a copy, so item writes cannot change a shared class.
        return dict(value) if name == "_field_defaults" else value
    if _is_user_object(obj):
        return getattr(obj, name)
    raise AttributeError(
        f"attribute {name!r} is private: '_' attributes are accessible only on objects "
        "defined in the REPL"
    )


def _special_getattr(obj: Any, name: str) -> Any:
    if name[0] == "_":
        return _private_getattr(obj, name)
    if name == "format" or name == "format_map":
        # Judge by what the lookup yields, not by the object: str subclasses, super()
        # proxies and classes all lead to the same two built-in methods.
        value = getattr(obj, name)
        if value is _STR_FORMAT:
            return _unbound_format
        if value is _STR_FORMAT_MAP:
            return _unbound_format_map
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and type(value) is types.BuiltinMethodType:
            return _bound_format(owner) if name == "format" else _bound_format_map(owner)
        return value
    if name == "obj" and isinstance(obj, AttributeError):
        # The object whose lookup failed: may be an internal object of host code.
        raise refuse_attr(name)
    elif name in ("send", "throw", "asend", "athrow", "aclose") and isinstance(obj, _ASYNC_STEPPERS):
        # Stepping a coroutine by hand would hand out the event loop's futures.
        raise AttributeError(
            f"{name}() on coroutines and async generators is not available in the "
            "sandbox; use await / async for"
        )
    value = getattr(obj, name)
    if name == "register":
        owner = getattr(value, "__self__", None)
        if isinstance(owner, abc.ABCMeta) and not _is_user_class(owner):
            raise AttributeError(
                "register() on shared abstract base classes would change them for every "
                "REPL and the host; subclass the ABC instead"
            )
    return value


def getattr_guard(obj: Any, name: str) -> Any:
    """Guard behind every compiled ``a.b`` (the name itself was checked at compile time)."""
    if type(obj) in _DENY_TYPES:
        raise AttributeError(f"{type(obj).__name__} objects are not accessible in the sandbox")
    if name in _TYPE_SENSITIVE or name[0] == "_":
        return _special_getattr(obj, name)
    return getattr(obj, name)


def guarded_getattr(obj: Any, name: str, default: Any = MISSING) -> Any:
    """``getattr`` as seen by user code: the compile-time name rules applied at run time."""
    if not isinstance(name, str):
        raise TypeError(f"attribute name must be a string, not {type(name).__name__}")
    try:
        if is_blocked_attr(name):
            raise refuse_attr(name)
        return getattr_guard(obj, name)
    except AttributeError:
        if default is MISSING:
            raise
        return default


def guarded_hasattr(obj: Any, name: str) -> bool:
    try:
        guarded_getattr(obj, name)
    except AttributeError:
        return False
    return True


_WRITABLE_STDLIB: tuple[type, ...] = (decimal.Context, textwrap.TextWrapper)
_SHARED_CONTEXTS = (decimal.DefaultContext, decimal.BasicContext, decimal.ExtendedContext)


def attr_writable(ob: Any) -> bool:
    cls = type(ob)
    if cls.__module__ == CELL_MODULE:
        return True  # an instance of a class defined in a cell
    if isinstance(ob, type):
        return ob.__module__ == CELL_MODULE
    if cls is types.FunctionType:
        return ob.__module__ == CELL_MODULE
    if isinstance(ob, _WRITABLE_STDLIB):
        return not any(ob is shared for shared in _SHARED_CONTEXTS)
    return False


def _refuse_write(ob: Any) -> AttributeError:
    what = ob.__name__ if isinstance(ob, type) else type(ob).__name__
    return AttributeError(
        f"cannot set or delete attributes of {what!r} objects in the sandbox: they are shared "
        "with the host; only objects of classes defined in the REPL (and their instances) "
        "can be changed"
    )


def write_guard(ob: Any) -> Any:
    """Guard behind ``a.b = v`` and ``del a.b`` (RestrictedPython's name for it)."""
    if attr_writable(ob):
        return ob
    raise _refuse_write(ob)


def guarded_setattr(ob: Any, name: str, value: Any) -> None:
    if not isinstance(name, str) or is_blocked_attr(name, write=True):
        raise refuse_attr(str(name))
    if not attr_writable(ob):
        raise _refuse_write(ob)
    setattr(ob, name, value)


def guarded_delattr(ob: Any, name: str) -> None:
    if not isinstance(name, str) or is_blocked_attr(name, write=True):
        raise refuse_attr(str(name))
    if not attr_writable(ob):
        raise _refuse_write(ob)
    delattr(ob, name)


_INPLACE: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
    ">>=": operator.irshift, "|=": operator.ior, "^=": operator.ixor, "&=": operator.iand,
    "//=": operator.ifloordiv, "@=": operator.imatmul,
}  # fmt: skip


def augattr_guard(ob: Any, name: str, op: str, value: Any) -> None:
    current = getattr_guard(ob, name)
    result = _INPLACE[op](current, value)
    if not attr_writable(ob):
        raise _refuse_write(ob)
    setattr(ob, name, result)


# -- str.format: the one formatting path that walks attributes at run time.


class SafeFormatter(string_module.Formatter):
    """``string.Formatter`` whose ``{0.attr}`` fields go through the sandbox's getattr guard."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        first, rest = _string.formatter_field_name_split(field_name)
        obj = self.get_value(first, args, kwargs)
        for is_attr, key in rest:
            obj = guarded_getattr(obj, key) if is_attr else obj[key]
        return obj, first


_FORMATTER = SafeFormatter()
_STR_FORMAT = str.format
_STR_FORMAT_MAP = str.format_map


def _needs_guard(template: str) -> bool:
    for _literal, name, spec, _conv in _string.formatter_parser(template):
        if (name and "." in name) or (spec and "{" in spec):
            return True
    return False


def _safe_format(template: str, args: tuple[Any, ...], kwargs: Any) -> str:
    if not _needs_guard(template):
        return str.format(template, *args, **kwargs)
    return _FORMATTER.vformat(template, args, kwargs)


def _bound_format(template: str) -> Callable[..., str]:
    def format(*args: Any, **kwargs: Any) -> str:  # noqa: A001 - mirrors str.format
        return _safe_format(template, args, kwargs)

    return format


def _bound_format_map(template: str) -> Callable[[Any], str]:
    def format_map(mapping: Any) -> str:
        if not _needs_guard(template):
            return str.format_map(template, mapping)
        return _FORMATTER.vformat(template, (), mapping)

    return format_map


def _unbound_format(template: str, *args: Any, **kwargs: Any) -> str:
    if not isinstance(template, str):
        raise TypeError("str.format needs a str as its first argument")
    return _safe_format(template, args, kwargs)


def _unbound_format_map(template: str, mapping: Any) -> str:
    if not isinstance(template, str):
        raise TypeError("str.format_map needs a str as its first argument")
    return _bound_format_map(template)(mapping)
