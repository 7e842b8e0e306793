"""The run-time guards of the sandbox policy: attribute reads and writes, and str.format.

Compiled code calls ``getattr_guard`` for every ``a.b`` it reads outside a few
everyday methods, ``write_guard`` before every ``a.b = v``, and ``augattr_guard`` for
``a.b += v``; the sandbox's ``getattr``, ``hasattr``, ``setattr``, ``delattr``,
``operator.attrgetter``/``methodcaller`` and ``str.format`` fields reach the same
rules. The name rules (``is_blocked_attr``) are shared with the compile-time check.

Objects defined in a cell carry ``CELL_MODULE`` as ``__module__``: that is how the
guards tell user objects (their own private attributes readable, attributes writable)
from the host's shared ones.

Class creation has one guard, ``check_cell_class``, that every route by which a cell
makes a class ends in (class statements through ``build_class``, the dataclass
decorator, namedtuple, the Enum functional API): a class deriving from a value type
cannot define how it hashes or compares equal, so no cell value can pass for another
in the host's caches and dicts.
"""

from __future__ import annotations

import _string  # type: ignore[import-not-found]  # C helpers behind str.format's parser
import abc
import asyncio
import concurrent.futures
import dataclasses
import decimal
import enum
import operator
import string as string_module
import textwrap
import threading
import types
import typing
import weakref
from collections.abc import Callable
from typing import Any

from rlm.sandbox.boundary import SandboxCoroutine
from rlm.sandbox.plaindata import exact_str

__all__ = [
    "BLOCKED_ATTRIBUTES",
    "CELL_MODULE",
    "MISSING",
    "READABLE_DUNDERS",
    "SafeFormatter",
    "attr_writable",
    "augattr_guard",
    "build_class",
    "check_cell_class",
    "dataclass_for_cell",
    "enum_from_names",
    "getattr_guard",
    "guarded_delattr",
    "guarded_getattr",
    "guarded_hasattr",
    "guarded_setattr",
    "is_blocked_attr",
    "make_match_class_guard",
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


_ASYNC_STEPPERS = (*_ASYNC_STEPPERS, *_probe_async_types(), SandboxCoroutine)


def _probe_coroutine_wrapper() -> type:
    async def coro() -> None:
        return None

    c = coro()
    kind = type(c.__await__())
    c.close()
    return kind

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
        # the iterator ``await`` drives: stepping it by hand would hand out the loop's futures
        _probe_coroutine_wrapper(),
    }
)

# Values the guard never hands out as they are. A mappingproxy forwards comparisons
# and ``|`` to the dict behind it, so a cell class's reflected ``__eq__``/``__ror__``
# would receive that dict (``re.Pattern.groupindex``, a shared class attribute) and
# could change it for the host and every other REPL: code gets a proxy of a copy.
# Classes are screened too (their type is a metaclass): a metaclass, ``type`` itself
# above all, must not be handed out. One set lookup keeps the common case fast.
_SCREENED_TYPES = _DENY_TYPES | {types.MappingProxyType, type, abc.ABCMeta}


def _screen(value: Any, name: str) -> Any:
    """What the guard hands out for ``value`` read as attribute ``name``."""
    kind = type(value)
    if kind is types.MappingProxyType:
        return types.MappingProxyType(dict(value))
    if kind in _DENY_TYPES:
        raise AttributeError(
            f"attribute {name!r} leads to {kind.__name__} objects, which are not accessible "
            "in the sandbox"
        )
    if issubclass(value, type):
        raise _refuse_metaclass(name)
    return value


def _refuse_metaclass(name: str) -> AttributeError:
    return AttributeError(
        f"attribute {name!r} is a metaclass (such as type itself), which is not accessible in "
        "the sandbox; use type(x) and isinstance()"
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
        if _cell_defines(obj, name):
            return getattr(obj, name)
        raise AttributeError(
            f"attribute {name!r} was not defined by code in the REPL: '_' attributes that "
            "come from the host's classes are not accessible in the sandbox"
        )
    raise AttributeError(
        f"attribute {name!r} is private: '_' attributes are accessible only on objects "
        "defined in the REPL"
    )


def _owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO whose own dict defines ``name``, or None."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return None


def _cell_defines(obj: Any, name: str) -> bool:
    """True if the private ``name`` of a cell object is one cell code put there.

    A cell class inherits the private methods of its host bases and metaclass too
    (``EnumType._convert_`` writes into any module's globals, ``ABCMeta._dump_registry``
    prints to the host's stdout): those stay out of reach. An instance's own values are
    its own, unless a host class's data descriptor of that name takes precedence.
    """
    if isinstance(obj, type):
        owner = _owner(obj, name)
        return owner is not None and _is_user_class(owner)  # None: the metaclass's
    if type(obj) is types.FunctionType:
        return True  # a cell function's attribute dict holds only what the cell set
    owner = _owner(type(obj), name)
    if owner is not None:
        if _is_user_class(owner):
            return True
        kind = type(vars(owner)[name])
        if hasattr(kind, "__set__") or hasattr(kind, "__delete__"):
            return False
    try:
        own = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return False
    return name in own


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
    if name == "register" and _registers_shared_abc(value):
        raise AttributeError(
            "register() on abstract base classes would change shared ones for every REPL "
            "and the host (registering with a subclass registers with its bases too); "
            "subclass the ABC instead"
        )
    return value


def _registers_shared_abc(value: Any) -> bool:
    # Judged by what the lookup yields: ABCMeta.register itself (through a metaclass or
    # an alias) or bound to any ABC whose bases include one of the host's.
    if value is abc.ABCMeta.register:
        return True
    owner = getattr(value, "__self__", None)
    if not isinstance(owner, abc.ABCMeta):
        return False
    return any(isinstance(k, abc.ABCMeta) and not _is_user_class(k) for k in owner.__mro__)


def getattr_guard(obj: Any, name: str) -> Any:
    """Guard behind every compiled ``a.b`` (the name itself was checked at compile time).

    Judges the object, then the name, then the value: frames, code, tracebacks,
    modules, futures and loops are refused however they were reached (an alias that
    relays attribute reads to its origin included), metaclasses are refused, and a
    mappingproxy is handed out as a proxy of a copy.
    """
    if type(obj) in _DENY_TYPES:
        raise AttributeError(f"{type(obj).__name__} objects are not accessible in the sandbox")
    if name in _TYPE_SENSITIVE or name[0] == "_":
        value = _special_getattr(obj, name)
    else:
        value = getattr(obj, name)
    if type(value) in _SCREENED_TYPES:
        return _screen(value, name)
    return value


def guarded_getattr(obj: Any, name: str, default: Any = MISSING) -> Any:
    """``getattr`` as seen by user code: the compile-time name rules applied at run time.

    The name is judged as an exact str (a str subclass's methods could lie to the
    rules while ``getattr`` uses its characters).
    """
    name = exact_str(name, "attribute name")
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
    """``setattr`` as seen by user code: the name rules, then the write rules."""
    name = exact_str(name, "attribute name")
    if is_blocked_attr(name, write=True):
        raise refuse_attr(name)
    if not attr_writable(ob):
        raise _refuse_write(ob)
    setattr(ob, name, value)


def guarded_delattr(ob: Any, name: str) -> None:
    """``delattr`` as seen by user code: the name rules, then the write rules."""
    name = exact_str(name, "attribute name")
    if is_blocked_attr(name, write=True):
        raise refuse_attr(name)
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


# -- class statements: what a class may derive from.


def _allowed_metaclasses() -> frozenset[type]:
    # The host metaclasses the allowed modules' classes use: plain classes, ABCs,
    # typing.Protocol, and the bases that typing.NamedTuple and TypedDict substitute.
    named = typing.NamedTuple.__mro_entries__((typing.NamedTuple,))[0]  # type: ignore[attr-defined]
    typed = typing.TypedDict.__mro_entries__((typing.TypedDict,))[0]  # type: ignore[attr-defined]
    return frozenset(
        {type, abc.ABCMeta, type(typing.Protocol), type(named), type(typed), _CellEnumType}
    )


# The methods a dict, a set or an lru_cache consults to decide that two keys are one.
# Ordering hooks (__lt__ ...) are left to cells: no cache a cell can reach orders its
# keys, so they only change the sorts, heaps and bisects a cell runs on its own data.
_KEY_HOOKS = ("__eq__", "__ne__", "__hash__")

# The __eq__ methods the dataclass decorator wrote for cell classes: they compare two
# instances of the same class field by field and nothing else, so a hashable dataclass
# may keep them. Weak: they go when their class goes.
_GENERATED_EQ: weakref.WeakSet[Any] = weakref.WeakSet()


def _value_base(cls: type) -> type | None:
    """The first host class in ``cls``'s MRO that hashes by value (str, int, tuple, Enum ...)."""
    for klass in cls.__mro__:
        if klass is not object and not _is_user_class(klass) and vars(klass).get("__hash__") is not None:
            return klass
    return None


def check_cell_class(cls: type) -> type:
    """The class-creation guard: ``cls`` if its instances cannot pass for other values as keys.

    Two rules, judged on the finished class (whatever made it: a class statement, a
    decorator, namedtuple, the Enum functional API). A class deriving from a host type
    that hashes by value (str, int, float, complex, bytes, tuple, frozenset, Enum,
    Decimal, date ...) takes ``__eq__``, ``__ne__`` and ``__hash__`` from the host,
    because re, _strptime, typing and functools caches key on such values and a forged
    hash with a lying ``__eq__`` would answer for another key, for every REPL and the
    host. A class whose hash a cell made (a frozen dataclass) keeps the ``__eq__`` the
    dataclass decorator wrote, for the same reason. A class breaking either rule raises
    TypeError (and is never bound to its name).
    """
    value = _value_base(cls)
    for name in _KEY_HOOKS:
        owner = _owner(cls, name)
        if owner is None or not _is_user_class(owner):
            continue
        if value is not None:
            raise TypeError(
                f"class {cls.__name__}: a subclass of {value.__name__} cannot define its own "
                f"{name} in the sandbox (not allowed: its values could pass for others in "
                "caches shared with the host); hold the value in an attribute of an ordinary "
                "class instead"
            )
        if name != "__hash__" and _hashes_by_cell(cls) and vars(owner)[name] not in _GENERATED_EQ:
            raise TypeError(
                f"class {cls.__name__}: a hashable class cannot define its own {name} in the "
                "sandbox (not allowed: with a hash of its choosing it could pass for another "
                "key in caches shared with the host); let @dataclass(frozen=True) write "
                "__eq__, or leave the class unhashable"
            )
    return cls


def _hashes_by_cell(cls: type) -> bool:
    owner = _owner(cls, "__hash__")
    return owner is not None and _is_user_class(owner) and vars(owner)["__hash__"] is not None


def dataclass_for_cell(cls: type, kwargs: dict[str, Any]) -> type:
    """``dataclasses.dataclass(cls, **kwargs)`` for a cell's class, then the class-creation guard.

    ``unsafe_hash=True`` is refused (it hashes a class whatever its equality says); the
    ``__eq__`` the decorator writes is recorded as one a hashable class may keep.
    """
    if kwargs.get("unsafe_hash"):
        raise TypeError(
            "dataclass(unsafe_hash=True) is not allowed in the sandbox; use "
            "@dataclass(frozen=True) for a hashable dataclass"
        )
    before = vars(cls).get("__eq__")
    made = dataclasses.dataclass(cls, **kwargs)
    written = vars(made).get("__eq__")
    if written is not None and written is not before:
        _GENERATED_EQ.add(written)
    return check_cell_class(made)


class _CellEnumType(enum.EnumType):
    """The metaclass of every enum made in a cell (in place of ``enum.EnumType``).

    Its functional API (``Color("Shade", "LIGHT DARK")`` on an enum without members)
    builds the class through ``enum_from_names`` and so through the class-creation
    guard; a lookup (``Color("red")``) is the usual one.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        functional = len(args) > 1 or bool(kwargs.keys() & _ENUM_CREATE_ARGS)
        if cls._member_map_ or not functional:
            return super().__call__(*args, **kwargs)
        return enum_from_names(cls, *args, **kwargs)


_ENUM_CREATE_ARGS = frozenset({"names", "module", "qualname", "type", "start", "boundary"})


def enum_from_names(
    base: type, value: Any, names: Any = None, *values: Any, module: Any = None,
    qualname: Any = None, type: Any = None, start: int = 1, boundary: Any = None,  # noqa: A002
) -> type:
    """The Enum functional API (``Enum("Color", "RED GREEN")``) as a cell may use it.

    The members become the body of a class statement made by ``build_class``, so the
    class passes the same guard; member names are exact strs not starting with "_"
    (no member can be a dunder method), and the class belongs to the cell (``module``
    cannot name another).
    """
    if values:
        raise TypeError("enum functional API: give the members as one argument")
    if module is not None and module != CELL_MODULE:
        raise TypeError("enum functional API: module= is not available in the sandbox")
    class_name = exact_str(value, "enum name")
    if names is None:
        names = ()
    if isinstance(names, str):
        names = exact_str(names).replace(",", " ").split()
    if isinstance(names, (tuple, list)) and names and isinstance(names[0], str):
        pairs: list[tuple[Any, Any]] = []
        last: list[Any] = []
        for count, member in enumerate(names):
            member = exact_str(member, "enum member name")  # the host's rule below reads it
            made = base._generate_next_value_(member, start, count, last[:])  # noqa: SLF001 - the host's own rule
            last.append(made)
            pairs.append((member, made))
    elif isinstance(names, dict):
        pairs = list(names.items())
    else:
        pairs = [tuple(item) for item in names]
    body: dict[str, Any] = {
        "__module__": CELL_MODULE,
        "__qualname__": class_name if qualname is None else exact_str(qualname, "qualname"),
    }
    for item in pairs:
        member, member_value = item
        member = exact_str(member, "enum member name")
        if member.startswith("_"):
            raise ValueError(f"enum member {member!r}: names starting with '_' are not available in the sandbox")
        body[member] = member_value
    bases = types.resolve_bases((base,) if type is None else (type, base))
    extra = {} if boundary is None else {"boundary": boundary}
    return build_class(class_name, bases, body, **extra)


_METACLASSES = _allowed_metaclasses()


def build_class(name: str, bases: tuple[Any, ...], namespace: dict[str, Any], **kwargs: Any) -> type:
    """The metaclass every class statement in a cell uses (RestrictedPython's ``__metaclass__``).

    It is a function, not a type, so the class body always runs in a plain dict (no
    ``__prepare__`` of anyone's). It sees the bases after ``__mro_entries__`` resolved
    them (``typing.Type[int]`` resolves to ``type`` itself) and refuses a metaclass as
    a base, then creates the class with the metaclass its bases call for, if that is
    one of the host's known metaclasses (an enum gets ``_CellEnumType``, and its body is
    replayed into the enum's own namespace), and hands it to ``check_cell_class``.
    """
    meta: type = type
    for base in bases:
        if not isinstance(base, type):
            raise TypeError(
                f"class {name}: cannot derive from {type(base).__name__} objects in the sandbox"
            )
        if issubclass(base, type):
            raise TypeError(
                f"class {name}: metaclasses (classes deriving from type) cannot be defined "
                "in the sandbox; define an ordinary class"
            )
        kind = type(base)
        if issubclass(kind, meta):
            meta = kind
        elif not issubclass(meta, kind):
            raise TypeError(f"class {name}: the metaclasses of its bases conflict")
    if meta is enum.EnumType:
        meta = _CellEnumType
    if meta not in _METACLASSES:
        raise TypeError(
            f"class {name}: its bases use the metaclass {meta.__name__!r}, which the sandbox "
            "does not allow; define an ordinary class"
        )
    if meta is _CellEnumType:
        # What the body would have done in the enum's own namespace, in the same order
        # (members, auto() values, aliases are decided as each name is set).
        replayed = meta.__prepare__(name, bases, **kwargs)
        for key, value in namespace.items():
            replayed[key] = value
        namespace = replayed
    return check_cell_class(meta(name, bases, namespace, **kwargs))


# -- match statements: class patterns read attributes of the subject.

# Types whose single positional sub-pattern matches the subject itself (no attribute read).
_MATCH_SELF = (bool, bytearray, bytes, dict, float, frozenset, int, list, set, str, tuple)


def _refuse_match(cls: type, name: str, why: str) -> TypeError:
    return TypeError(
        f"match: the class pattern {cls.__name__}(...) cannot read {name!r} in the sandbox "
        f"({why}); use isinstance() and attribute access instead"
    )


class _MatchGate(type):
    """Metaclass of the stand-ins that class patterns with sub-patterns match against.

    ``isinstance`` is the first thing a class pattern does; the gate answers it for the
    real class and, when the subject is an instance, judges every attribute the pattern
    is about to read natively: the names by the guard's rules, the values by what the
    guard would hand out. A read the guard would refuse or change stops the match.
    """

    target: type
    reads: tuple[str, ...]

    def __instancecheck__(cls, subject: Any) -> bool:
        target = cls.target
        if not isinstance(subject, target):
            return False
        user = _is_user_object(subject)
        for name in cls.reads:
            if name[0] == "_" and not user:
                raise _refuse_match(target, name, "'_' attributes are private to REPL objects")
            try:
                native = getattr(subject, name)
            except AttributeError:
                continue  # the pattern fails on its own
            if type(native) in _SCREENED_TYPES:
                try:
                    screened = _screen(native, name)
                except AttributeError:
                    screened = None
                if screened is not native:
                    raise _refuse_match(target, name, f"{type(native).__name__} values are guarded")
        return True

    def __subclasscheck__(cls, other: Any) -> bool:
        return issubclass(other, cls.target)


def _match_args(cls: type, positional: int) -> tuple[str, ...]:
    args = getattr(cls, "__match_args__", ())
    if type(args) is not tuple:
        raise TypeError(f"{cls.__name__}.__match_args__ must be a tuple")
    names = []
    for item in args[:positional]:
        if type(item) is not str:
            raise TypeError(f"{cls.__name__}.__match_args__ may hold only exact strings")
        if is_blocked_attr(item):
            raise _refuse_match(cls, item, "it is an internal or dunder attribute")
        names.append(item)
    return tuple(names)


def _pattern_class(real: type, positional: int, keywords: tuple[str, ...]) -> type:
    own_args = any("__match_args__" in vars(k) for k in real.__mro__)
    if not keywords and positional <= 1 and not own_args and issubclass(real, _MATCH_SELF):
        return real  # ``case str(s)``: the sub-pattern matches the subject itself
    names = _match_args(real, positional) if own_args else ()
    if type(real) is type and all(_is_user_class(k) for k in real.__mro__[:-1]):
        # A class made in a cell from cell classes only: its instances hold nothing but
        # what cell code put there, so once the names passed, native reads are the
        # code's own reads (and the fast path for everyday ``case Point(x, y)``).
        return real
    body: dict[str, Any] = {"target": real, "reads": names + keywords}
    if own_args:
        body["__match_args__"] = names
    return _MatchGate(real.__name__, (), body)


def make_match_class_guard(standins: dict[int, type]) -> Callable[[Any, int, tuple[str, ...]], Any]:
    """The hook a compiled class pattern's class goes through (see compiler.MATCH_CLASS_HOOK).

    ``standins`` maps ``id()`` of the namespace's builtin stand-ins (``list``, ``type``
    ...) to the real types, so ``case list(...)`` works. A pattern without sub-patterns
    reads nothing and gets the class itself; so does a single positional sub-pattern
    on a type that matches itself (``case str(s)``). Otherwise the pattern matches
    against a ``_MatchGate`` stand-in (one per class and shape, cached per namespace).
    """
    chosen: dict[tuple[type, int, tuple[str, ...]], type] = {}

    def match_class(cls: Any, positional: int, keywords: tuple[str, ...]) -> Any:
        real = standins.get(id(cls), cls)
        if (positional == 0 and not keywords) or not isinstance(real, type):
            return real  # nothing is read (and Python itself refuses a non-class)
        key = (real, positional, keywords)
        got = chosen.get(key)
        if got is None:
            got = chosen[key] = _pattern_class(real, positional, keywords)
        return got

    return match_class


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
