"""What ``import`` gives a cell: an allowlist of modules, each a read-only facade.

A facade holds a module's public functions, classes and constants, never a module,
nothing leading to the real sys, os, builtins, importlib or inspect (the ``sys`` facade
holds three harmless values; ``io`` only the in-memory files; ``asyncio`` is
``asyncio_facade``), and no shared mutable
container (classes holding one are replaced by subclasses with read-only copies).
A few functions are replaced by guarded versions (operator.attrgetter/methodcaller,
dataclasses.dataclass, collections.namedtuple, functools.wraps), and the Enum classes by
stand-ins whose functional API makes classes through the class-creation guard. random,
time, pprint, itertools, functools, csv, difflib and asyncio get one facade per
namespace, because their functions need its RNG, deadline, output, CSV field limit,
HtmlDiff counter or loop; the others are built once per process and shared.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import csv
import dataclasses
import difflib
import enum
import functools
import importlib
import io
import itertools
import operator
import pprint as pprint_module
import random as random_module
import string as string_module
import sys
import time as time_module
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rlm.sandbox.asyncio_facade import CellTasks, asyncio_exports
from rlm.sandbox.boundary import guard_host_function
from rlm.sandbox.guards import (
    CELL_MODULE,
    MISSING,
    SafeFormatter,
    attr_writable,
    check_cell_class,
    dataclass_for_cell,
    enum_from_names,
    getattr_guard,
    guarded_getattr,
    is_blocked_attr,
    refuse_attr,
)
from rlm.sandbox.plaindata import exact_str
from rlm.sandbox.safe_builtins import checked_iter, chunks

__all__ = [
    "ALLOWED_MODULES",
    "C_IMPORTS",
    "EnumBase",
    "ModuleFacade",
    "importable_modules",
    "make_importer",
]


class ModuleFacade:
    """A read-only stand-in for an allowed module: its public functions, classes, constants.

    No attribute is a module; nothing leads to sys, os, builtins, importlib or inspect;
    attributes cannot be set. It deliberately has no ``__name__``, so a failed
    ``from m import x`` cannot fall back to ``sys.modules``.
    """

    __slots__ = ("_facade_name", "_facade_attrs")

    def __init__(self, name: str, attrs: dict[str, Any]) -> None:
        try:
            object.__getattribute__(self, "_facade_attrs")
        except AttributeError:
            pass
        else:  # facades are shared between envs: never re-initialised
            raise AttributeError(f"module {name!r} is read-only in the sandbox")
        object.__setattr__(self, "_facade_name", name)
        object.__setattr__(self, "_facade_attrs", types.MappingProxyType(dict(attrs)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._facade_attrs[name]
        except KeyError:
            raise AttributeError(
                f"module {self._facade_name!r} has no attribute {name!r} in the sandbox"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"module {self._facade_name!r} is read-only in the sandbox")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"module {self._facade_name!r} is read-only in the sandbox")

    def __dir__(self) -> list[str]:
        return sorted(self._facade_attrs)

    def __repr__(self) -> str:
        return f"<module {self._facade_name!r} (sandboxed)>"


ALLOWED_MODULES = (
    "asyncio", "base64", "bisect", "collections", "collections.abc", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "hashlib",
    "heapq", "html", "io", "itertools", "json", "math", "operator", "pprint", "random", "re",
    "statistics", "string", "sys", "textwrap", "time", "typing", "unicodedata", "__future__",
)  # fmt: skip

# Extra module names a module's own objects may carry as ``__module__``.
_FAMILY_EXTRA = {
    "hashlib": ("_blake2", "_sha3", "_md5", "_sha1", "_sha2", "_sha256", "_sha512"),
}

# Public names held back from the automatic facades, and why.
_DENY = {
    # shared, mutable templates for every thread's decimal context in the host
    "decimal": {"DefaultContext", "BasicContext", "ExtendedContext"},
    # process-wide registries and limits
    "csv": {"register_dialect", "unregister_dialect", "field_size_limit"},  # per-REPL version
    "hashlib": {"file_digest"},
    "datetime": {"datetime_CAPI"},
    "__future__": {"all_feature_names"},
}

_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None))


def _is_constant(v: Any) -> bool:
    if isinstance(v, _CONSTANT_TYPES):
        return type(v) in _CONSTANT_TYPES or isinstance(v, int)  # enum flags are ints
    if type(v) in (tuple, frozenset):
        return builtins.all(_is_constant(x) for x in v)
    return False


def _in_family(modname: Any, name: str) -> bool:
    if not isinstance(modname, str):
        return False
    top = name.split(".")[0]
    if modname in (name, "_" + top) or modname.startswith((name + ".", "_" + top + ".")):
        return True
    if name == "collections" and modname == "collections.abc":
        return False  # handed out as its own facade
    return modname in _FAMILY_EXTRA.get(name, ())


_MUTABLE = (dict, list, set, bytearray, collections.deque)


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return types.MappingProxyType(dict(value))
    if isinstance(value, (set, frozenset)):
        return frozenset(value)
    return tuple(value)


def _without_shared_containers(cls: type) -> type | None:
    """``cls``, or a subclass whose public mutable class attributes are read-only copies.

    Item writes run natively (see _CellTransformer.visit_Subscript), so a dict held by
    a shared class (``textwrap.TextWrapper.unicode_whitespace_trans``) would let one REPL
    change it for the host and every other REPL. None if it cannot be subclassed.
    """
    mutable = {}
    for klass in reversed(cls.__mro__[:-1]):
        for key, value in vars(klass).items():
            if not key.startswith("_") and isinstance(value, _MUTABLE):
                mutable[key] = _frozen(value)
    if not mutable:
        return cls
    try:
        frozen = type(cls.__name__, (cls,), {**mutable, "__module__": cls.__module__})
    except TypeError:
        return None
    frozen.__qualname__ = cls.__qualname__
    return frozen


def _exports(mod: types.ModuleType, name: str, deny: Iterable[str] = ()) -> dict[str, Any]:
    names = getattr(mod, "__all__", None) or [n for n in builtins.dir(mod) if not n.startswith("_")]
    denied = set(deny) | _DENY.get(name, set())
    out: dict[str, Any] = {}
    for attr in names:
        if attr.startswith("_") or attr in denied:
            continue
        try:
            value = getattr(mod, attr)
        except AttributeError:
            continue
        if isinstance(value, types.ModuleType):
            continue
        if _is_constant(value):
            out[attr] = value
        elif isinstance(value, type):
            if _in_family(value.__module__, name):
                safe = _without_shared_containers(value)
                if safe is not None:
                    out[attr] = safe
        elif callable(value):
            if _in_family(getattr(value, "__module__", None), name):
                out[attr] = value
        elif _in_family(type(value).__module__, name) and not isinstance(
            value, (list, dict, set, bytearray)
        ):
            out[attr] = value
    return out


def _safe_attrgetter(*attrs: str) -> Callable[[Any], Any]:
    # Exact strs, judged once here and used as judged (a str subclass's split could lie).
    attrs = tuple(exact_str(a, "attribute name") for a in attrs)
    for a in attrs:
        for part in a.split("."):
            if is_blocked_attr(part):
                raise refuse_attr(part)

    def resolve(obj: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            obj = guarded_getattr(obj, part)
        return obj

    def attrgetter(obj: Any) -> Any:
        if len(attrs) == 1:
            return resolve(obj, attrs[0])
        return tuple(resolve(obj, a) for a in attrs)

    return attrgetter


def _safe_methodcaller(name: str, /, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    name = exact_str(name, "method name")
    if is_blocked_attr(name):
        raise refuse_attr(name)

    def methodcaller(obj: Any) -> Any:
        return guarded_getattr(obj, name)(*args, **kwargs)

    return methodcaller


def _user_class_only(what: str, cls: Any) -> None:
    if not attr_writable(cls):
        raise TypeError(
            f"{what} can only be applied to classes and functions defined in the REPL "
            "(it would change a shared one for every REPL and the host)"
        )


def _safe_dataclass(cls: Any = None, /, **kwargs: Any) -> Any:
    def wrap(c: Any) -> Any:
        _user_class_only("dataclass", c)
        return dataclass_for_cell(c, kwargs)

    return wrap if cls is None else wrap(cls)


def _safe_namedtuple(
    typename: str, field_names: Any, *, rename: bool = False, defaults: Any = None, module: Any = None
) -> type:
    # The class belongs to the cell (module= could name a host module and so pass the
    # class off as the host's), and it passes the class-creation guard like any other.
    if module is not None and module != CELL_MODULE:
        raise TypeError("namedtuple(module=...) is not available in the sandbox")
    made = collections.namedtuple(
        typename, field_names, rename=rename, defaults=defaults, module=CELL_MODULE
    )
    return check_cell_class(made)


class EnumBase:
    """Stands in for ``enum.Enum`` (and IntEnum, StrEnum, Flag, IntFlag) in the sandbox.

    Deriving from it derives from the real class (``__mro_entries__``), so ``class
    Color(str, Enum)`` is an ordinary class statement; isinstance and issubclass answer
    for the real class; calling it is the functional API, which makes the class through
    the class-creation guard instead of ``EnumType.__call__``.
    """

    __slots__ = ("_real",)

    def __init__(self, real: type) -> None:
        self._real = real

    def __call__(self, *args: Any, **kwargs: Any) -> type:
        return enum_from_names(self._real, *args, **kwargs)

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (self._real,)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._real)

    def __subclasscheck__(self, cls: Any) -> bool:
        return issubclass(cls, self._real)

    def __getattr__(self, name: str) -> Any:
        if name in ("__name__", "__qualname__"):
            return getattr(self._real, name)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr_guard(self._real, name)

    def __eq__(self, other: Any) -> bool:
        return other is self or other is self._real

    def __hash__(self) -> int:
        return hash(self._real)

    def __repr__(self) -> str:
        return repr(self._real)


_ENUM_CLASSES = ("Enum", "IntEnum", "StrEnum", "Flag", "IntFlag")


def _safe_total_ordering(cls: Any) -> Any:
    _user_class_only("total_ordering", cls)
    return functools.total_ordering(cls)


def _safe_update_wrapper(wrapper: Any, wrapped: Any, *args: Any, **kwargs: Any) -> Any:
    # The real one copies (and sets) arbitrary attribute names given by the caller.
    if args or kwargs:
        raise TypeError("update_wrapper()/wraps() take no assigned/updated arguments in the sandbox")
    _user_class_only("update_wrapper/wraps", wrapper)
    for attr in ("__name__", "__qualname__", "__doc__"):
        try:
            value = getattr(wrapped, attr)
        except AttributeError:
            continue
        if isinstance(value, str) or value is None:
            try:
                setattr(wrapper, attr, value)
            except (AttributeError, TypeError):
                pass
    wrapper.__wrapped__ = wrapped
    return wrapper


def _safe_wraps(wrapped: Any, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    if args or kwargs:
        raise TypeError("wraps() takes no assigned/updated arguments in the sandbox")

    def decorator(wrapper: Any) -> Any:
        return _safe_update_wrapper(wrapper, wrapped)

    return decorator


# Not get_origin/get_args: ``get_origin(Type[int])`` is the real ``type``, whose
# three-argument form makes classes with arbitrary dunder methods.
_TYPING_NAMES = (
    "Any", "AnyStr", "Annotated", "AsyncGenerator", "AsyncIterable", "AsyncIterator",
    "Awaitable", "Callable", "ChainMap", "ClassVar", "Collection", "Container", "Coroutine",
    "Counter", "DefaultDict", "Deque", "Dict", "Final", "FrozenSet", "Generator", "Generic",
    "Hashable", "ItemsView", "Iterable", "Iterator", "KeysView", "List", "Literal", "Mapping",
    "MappingView", "Match", "MutableMapping", "MutableSequence", "MutableSet", "NamedTuple",
    "NoReturn", "Optional", "OrderedDict", "Pattern", "Protocol", "Reversible", "Sequence",
    "Set", "Sized", "SupportsAbs", "SupportsFloat", "SupportsIndex", "SupportsInt",
    "SupportsRound", "Text", "Tuple", "Type", "TypedDict", "TypeVar", "Union", "ValuesView",
    "TYPE_CHECKING", "cast", "Self", "Never", "LiteralString",
    "Required", "NotRequired", "TypeAlias", "ParamSpec", "Concatenate", "TypeGuard",
)  # fmt: skip

_TIME_NAMES = (
    "time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns",
    "process_time", "process_time_ns", "strftime", "strptime", "gmtime", "localtime",
    "mktime", "asctime", "ctime", "struct_time", "timezone", "altzone", "daylight", "tzname",
)  # fmt: skip

_RANDOM_METHODS = (
    "random", "randint", "randrange", "choice", "choices", "shuffle", "sample", "uniform",
    "gauss", "normalvariate", "lognormvariate", "expovariate", "vonmisesvariate",
    "gammavariate", "betavariate", "paretovariate", "weibullvariate", "triangular",
    "getrandbits", "randbytes", "seed", "getstate", "setstate", "binomialvariate",
)  # fmt: skip


@functools.cache
def _static_facade(name: str) -> ModuleFacade:
    """Facades with no per-namespace state, built once per process and shared."""
    if name == "typing":
        attrs = {n: getattr(typing, n) for n in _TYPING_NAMES if hasattr(typing, n)}
    elif name == "collections":
        attrs = _exports(collections, name)
        attrs["abc"] = _static_facade("collections.abc")
        attrs["namedtuple"] = _safe_namedtuple
    elif name == "enum":
        attrs = {n: EnumBase(getattr(enum, n)) for n in _ENUM_CLASSES if hasattr(enum, n)}
        attrs.update(auto=enum.auto, unique=enum.unique)
    elif name == "operator":
        attrs = _exports(operator, name)
        attrs.update(attrgetter=_safe_attrgetter, methodcaller=_safe_methodcaller)
    elif name == "dataclasses":
        attrs = _exports(dataclasses, name, deny={"make_dataclass"})
        attrs["dataclass"] = _safe_dataclass
    elif name == "io":
        # In-memory files only (csv.reader(io.StringIO(text)) is a daily idiom); no open().
        attrs = {"StringIO": io.StringIO, "BytesIO": io.BytesIO}
    elif name == "sys":
        # What scripts read from sys, and nothing that leads to the interpreter.
        attrs = {"maxsize": sys.maxsize, "version_info": sys.version_info, "getsizeof": sys.getsizeof}
    elif name == "string":
        attrs = _exports(string_module, name, deny={"Formatter"})
        attrs["Formatter"] = SafeFormatter
    else:
        attrs = _exports(importlib.import_module(name), name)
    return ModuleFacade(name, attrs)


def _env_facade(
    name: str,
    ns: dict[str, Any],
    sleep: Callable[[float], None],
    write_stdout: Callable[[str], Any],
    tasks: CellTasks,
    cell_loop: Callable[[], asyncio.AbstractEventLoop | None],
) -> ModuleFacade:
    """Facades whose functions need this namespace: its deadline, RNG or output."""
    if name == "random":
        rng = random_module.Random()  # per namespace: seeding one REPL does not affect another
        attrs: dict[str, Any] = {n: getattr(rng, n) for n in _RANDOM_METHODS if hasattr(rng, n)}
        attrs.update(Random=random_module.Random, SystemRandom=random_module.SystemRandom)
        return ModuleFacade(name, attrs)
    if name == "time":
        attrs = {n: getattr(time_module, n) for n in _TIME_NAMES if hasattr(time_module, n)}
        attrs["sleep"] = sleep
        return ModuleFacade(name, attrs)
    if name == "pprint":

        def pprint(obj: Any, stream: Any = None, **kwargs: Any) -> None:
            text = pprint_module.pformat(obj, **kwargs) + "\n"
            if stream is None:
                write_stdout(text)
            else:
                guarded_getattr(stream, "write")(text)

        def pp(obj: Any, *args: Any, sort_dicts: bool = False, **kwargs: Any) -> None:
            pprint(obj, *args, sort_dicts=sort_dicts, **kwargs)

        return ModuleFacade(
            name,
            dict(
                pprint=pprint, pp=pp, pformat=pprint_module.pformat,
                saferepr=pprint_module.saferepr, isreadable=pprint_module.isreadable,
                isrecursive=pprint_module.isrecursive,
            ),
        )
    if name == "itertools":
        attrs = _exports(itertools, name)

        def count(start: Any = 0, step: Any = 1) -> Iterator[Any]:
            return checked_iter(ns, itertools.count(start, step))

        def cycle(iterable: Iterable[Any]) -> Iterator[Any]:
            return checked_iter(ns, itertools.cycle(iterable))

        def repeat(obj: Any, *times: Any) -> Iterator[Any]:
            if times:
                return itertools.repeat(obj, *times)
            return checked_iter(ns, itertools.repeat(obj))

        attrs.update(count=count, cycle=cycle, repeat=repeat)
        return ModuleFacade(name, attrs)
    if name == "functools":
        attrs = _exports(functools, name, deny={"singledispatch", "singledispatchmethod"})

        def reduce(function: Callable[[Any, Any], Any], iterable: Iterable[Any], *initial: Any) -> Any:
            pieces = chunks(ns, iterable)
            if initial:
                acc = initial[0]
            else:
                acc = MISSING
            for chunk in pieces:
                if acc is MISSING:
                    if not chunk:
                        continue
                    acc = functools.reduce(function, chunk)
                else:
                    acc = functools.reduce(function, chunk, acc)
            if acc is MISSING:
                raise TypeError("reduce() of empty iterable with no initial value")
            return acc

        attrs.update(
            reduce=reduce, total_ordering=_safe_total_ordering,
            update_wrapper=_safe_update_wrapper, wraps=_safe_wraps,
        )
        return ModuleFacade(name, attrs)
    if name == "difflib":
        attrs = _exports(difflib, name)
        attrs["HtmlDiff"] = _html_diff_class()
        return ModuleFacade(name, attrs)
    if name == "csv":
        attrs = _exports(csv, name)
        limit = [_CSV_DEFAULT_FIELD_LIMIT]

        def field_size_limit(*new_limit: int) -> int:
            """This REPL's CSV field size limit: returns the old one, sets a new one if given."""
            old = limit[0]
            if new_limit:
                (value,) = new_limit
                if type(value) is not int or value < 0:
                    raise TypeError("field_size_limit takes one int >= 0")
                limit[0] = value
                # The C reader's limit is one per process: it only ever rises, so one REPL
                # asking for long fields never makes another REPL's (or the host's) reads fail.
                if value > _csv_process_limit():
                    csv.field_size_limit(value)
            return old

        attrs["field_size_limit"] = field_size_limit
        return ModuleFacade(name, attrs)
    if name == "asyncio":
        # Its coroutine functions hand out SandboxCoroutines: no host frame behind them.
        exports = asyncio_exports(tasks, cell_loop)
        return ModuleFacade(name, {k: guard_host_function(k, v) for k, v in exports.items()})
    raise KeyError(name)


def _html_diff_class() -> type:
    """An HtmlDiff whose anchor counter belongs to one namespace.

    The real one numbers the tables it makes with a process-wide class counter, so one
    REPL's anchors would tell how many tables other REPLs (and the host) had made.
    """
    made = [0]

    class HtmlDiff(difflib.HtmlDiff):
        def _make_prefix(self) -> None:
            self._prefix = [f"from{made[0]}_", f"to{made[0]}_"]
            made[0] += 1

    HtmlDiff.__module__ = difflib.HtmlDiff.__module__
    HtmlDiff.__qualname__ = difflib.HtmlDiff.__qualname__
    return HtmlDiff


# CPython's default, what each REPL starts with whatever other REPLs asked for.
_CSV_DEFAULT_FIELD_LIMIT = 128 * 1024


def _csv_process_limit() -> int:
    return csv.field_size_limit()  # no argument: reads the limit, changes nothing


_PER_NAMESPACE = frozenset(
    {"random", "time", "pprint", "itertools", "functools", "csv", "asyncio", "difflib"}
)


# Modules that C functions of allowed modules import lazily while a cell runs.
C_IMPORTS = frozenset({"_strptime"})


# Data libraries that cannot be made into facades (numpy reaches ctypes, pandas reads
# pickles and files). A cell gets the real modules only in a worker process whose OS
# layer (filesystem jail, no network, unprivileged uid) is what holds, and only when
# they are installed (the [data] extra).
DATA_MODULES = ("numpy", "pandas", "yaml")


class DataModuleView:
    """A data library as a confined worker's cells see it: its public attributes, with
    submodules as views too. Only the OS layer bounds what these libraries can do, which
    is why only a confined worker hands them out."""

    __slots__ = ("_view_of",)

    def __init__(self, module: types.ModuleType) -> None:
        object.__setattr__(self, "_view_of", module)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise refuse_attr(name)
        value = getattr(self._view_of, name)
        return DataModuleView(value) if isinstance(value, types.ModuleType) else value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"module {self._view_of.__name__!r} is read-only in the sandbox")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"module {self._view_of.__name__!r} is read-only in the sandbox")

    def __dir__(self) -> list[str]:
        return [n for n in dir(self._view_of) if not n.startswith("_")]

    def __repr__(self) -> str:
        return f"<module {self._view_of.__name__!r} (sandboxed)>"


def importable_modules(data_modules: Iterable[str] = ()) -> list[str]:
    """The module names a cell may import (what the root's system prompt lists)."""
    return [m for m in ALLOWED_MODULES if m != "__future__"] + list(data_modules)


def _import_refusal(name: str) -> ImportError:
    allowed = ", ".join(m for m in ALLOWED_MODULES if m != "__future__")
    if name.split(".")[0] in DATA_MODULES:
        return ImportError(
            f"import of {name!r} is not available here: {', '.join(DATA_MODULES)} are given only "
            "in sandbox='process' with its filesystem jail and network isolation active, and "
            "only when installed (pip install 'rlm-sandbox[data]'). Use csv, json, statistics and "
            f"collections instead. Allowed modules: {allowed}"
        )
    return ImportError(
        f"import of {name!r} is not allowed in the sandbox. Allowed modules: {allowed}. "
        "Files, the network, processes and the interpreter are out of reach by design; "
        "the data is in `context` and sub-queries go through llm_query"
    )


def make_importer(
    ns: dict[str, Any],
    *,
    sleep: Callable[[float], None],
    write_stdout: Callable[[str], Any],
    tasks: CellTasks | None = None,
    cell_loop: Callable[[], asyncio.AbstractEventLoop | None] = lambda: None,
    data_modules: Iterable[str] = (),
    on_data_import: Callable[[str], Any] | None = None,
) -> Callable[..., Any]:
    """The ``__import__`` of one namespace: allowed modules as facades, the rest refused.

    ``sleep`` (a deadline-aware wait) and ``write_stdout`` (the namespace's output) are
    what the per-namespace facades of time and pprint need from the namespace; ``tasks``
    (cancelled when a cell ends) and ``cell_loop`` (the loop cells run on) are asyncio's.
    ``on_data_import`` is told the name of each data library handed out (their global
    settings are process-wide, so a worker that gave one out is not lent again).
    """
    cell_tasks = tasks if tasks is not None else CellTasks()
    real_modules = frozenset(data_modules) & frozenset(DATA_MODULES)
    cache: dict[str, ModuleFacade] = {}

    def facade(name: str) -> ModuleFacade:
        got = cache.get(name)
        if got is None:
            if name in _PER_NAMESPACE:
                got = _env_facade(name, ns, sleep, write_stdout, cell_tasks, cell_loop)
            else:
                got = _static_facade(name)
            cache[name] = got
        return got

    def __import__(  # noqa: N807 - this is the import hook
        name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
    ) -> ModuleFacade:
        if type(fromlist) is list and name in C_IMPORTS:
            # C code of an allowed module importing its helper (datetime.strptime needs
            # _strptime) through the current builtins. Import statements in cells pass a
            # tuple or None, never a list, so only C callers get the real module.
            return importlib.import_module(name)
        if level:
            raise ImportError("relative imports are not available in the sandbox")
        if not issubclass(type(name), str):
            raise _import_refusal(repr(name))
        name = exact_str(name)  # judged (and imported) by its real characters
        if name.split(".")[0] in real_modules:
            if on_data_import is not None:
                on_data_import(name)
            module = importlib.import_module(name if fromlist else name.split(".")[0])
            return DataModuleView(module)
        if name not in ALLOWED_MODULES:
            raise _import_refusal(name)
        if fromlist or "." not in name:
            return facade(name)
        return facade(name.split(".")[0])

    return __import__


