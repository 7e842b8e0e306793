"""What cells leave in the host's modules: the judged list of their mutable state, and clearing it.

A cell never holds a module (it gets read-only facades), but the functions it calls keep
state at module level: ``re`` and ``_strptime`` cache compiled patterns under the pattern
a cell passed, ``typing`` caches the aliases a cell made, ``fractions`` caches hashes. In
the in-process sandbox that state is the host's own and every other REPL's; in a warm
worker it is the next task's. ``JUDGED`` lists every mutable module global (and mutable
class attribute, and every name rebound at run time) of the modules whose code a cell can
run, each with a verdict and the reason for it:

- ``CLEARED``: cells can write it; ``clear_shared_state()`` empties it;
- ``IMMUTABLE``: a table or a lazily built constant that nothing a cell calls changes
  in a way another caller could see;
- ``UNREACHABLE``: no function a cell is handed writes or reads it.

``tests/sandbox/test_shared_state.py`` walks those modules and fails on any entry not
judged here, so a new mutable global in a new Python release is judged before it ships.
``clear_shared_state()`` runs whenever a namespace is released
(``cells.release_namespace``): when an in-process REPL closes, and when a worker resets
for its next REPL. Two rules keep what remains harmless between resets: no cell value
can pass for another key (``guards.check_cell_class``), and difflib's anchor counter is
per namespace (``modules``).

Not module-level, and so judged here in words only: decimal's context belongs to the
thread a cell runs on (in-process, one thread per REPL; a worker resets it); asyncio's
running loop is the cell's own private loop.

What this module must not hold: rules about what a cell may call (``modules``,
``guards``); only the state those calls leave behind.
"""

from __future__ import annotations

import re
import sys
import typing
from collections.abc import Callable, Iterable

__all__ = ["CLEARED", "ENUM_TABLES", "IMMUTABLE", "JUDGED", "UNREACHABLE", "clear_shared_state"]

CLEARED = "cleared on reset"
IMMUTABLE = "immutable in practice"
UNREACHABLE = "not reachable"

Judgement = tuple[str, str]  # (verdict, reason)


def _all(verdict: str, reason: str, names: Iterable[str]) -> dict[str, Judgement]:
    return {name: (verdict, reason) for name in names}


# The bookkeeping every Enum class keeps (members by name and value), judged once for
# the enum classes of every audited module: filled when the class is made, never after.
ENUM_TABLES: dict[str, Judgement] = _all(
    IMMUTABLE,
    "an enum class's member tables, filled when the class is made; a cell cannot add "
    "members to a host enum (EnumType refuses, and its private methods are out of reach)",
    ("_member_map_", "_member_names_", "_value2member_map_", "_unhashable_values_",
     "_unhashable_values_map_"),
)  # fmt: skip

_RE_TABLES = "opcode and category tables of the regular expression compiler, read only"
_TYPING_ALIAS = (
    "typing's alias of a builtin container: its attribute reads go to the builtin type, "
    "and it holds nothing"
)
_FIELD_DEFAULTS = "a namedtuple's defaults; the guard hands cells a copy"
_TASKS = (
    "asyncio's registry of tasks: asyncio.all_tasks/current_task are not in the facade, and "
    "a cell's tasks leave it when they end (cells cancel their tasks)"
)

JUDGED: dict[str, dict[str, Judgement]] = {
    "re": {
        "_cache": (CLEARED, "compiled patterns keyed by (type, pattern, flags): re.purge()"),
        "_cache2": (CLEARED, "the second compiled-pattern cache (3.13): re.purge()"),
        "_compile_repl": (CLEARED, "lru_cache of parsed replacement templates: re.purge()"),
        "_compile_template": (CLEARED, "lru_cache of parsed replacement templates: re.purge()"),
        "_special_chars_map": (IMMUTABLE, "re.escape's translation table, read only"),
    },
    "re._casefix": {"_EXTRA_CASES": (IMMUTABLE, _RE_TABLES)},
    "re._compiler": _all(IMMUTABLE, _RE_TABLES, (
        "ATCODES", "AT_LOCALE", "AT_MULTILINE", "AT_UNICODE", "CHCODES", "CH_LOCALE",
        "CH_UNICODE", "OPCODES", "OP_IGNORE", "OP_LOCALE_IGNORE", "OP_UNICODE_IGNORE",
        "_ASSERT_CODES", "_EXTRA_CASES", "_LITERAL_CODES", "_REPEATING_CODES",
        "_SUCCESS_CODES", "_UNIT_CODES",
    )),
    "re._constants": _all(IMMUTABLE, _RE_TABLES, (
        "ATCODES", "AT_LOCALE", "AT_MULTILINE", "AT_UNICODE", "CHCODES", "CH_LOCALE",
        "CH_UNICODE", "OPCODES", "OP_IGNORE", "OP_LOCALE_IGNORE", "OP_UNICODE_IGNORE",
    )),
    "re._parser": _all(IMMUTABLE, _RE_TABLES, (
        "ATCODES", "AT_LOCALE", "AT_MULTILINE", "AT_UNICODE", "CATEGORIES", "CHCODES",
        "CH_LOCALE", "CH_UNICODE", "ESCAPES", "FLAGS", "OPCODES", "OP_IGNORE",
        "OP_LOCALE_IGNORE", "OP_UNICODE_IGNORE",
    )),
    "_strptime": {
        "_regex_cache": (CLEARED, "compiled format regexes keyed by the format str a cell passed"),
        "_TimeRE_cache": (
            IMMUTABLE,
            "directive regexes of the current locale, rebuilt only when the locale changes "
            "(no cell can change it); keyed by directive letters, never by cell input",
        ),
    },
    "typing": {
        "_cleanups": (
            CLEARED,
            "the cache_clear of every typing cache (aliases and Literal/Union/Annotated "
            "a cell subscripts, which keep their arguments alive): all called",
        ),
        "_caches": (CLEARED, "the same typing caches by function (3.12+): cleared through _cleanups"),
        "_lazy_load_getattr_static": (IMMUTABLE, "caches one import (inspect.getattr_static), no argument"),
        "_overload_registry": (UNREACHABLE, "typing.overload is not in the facade"),
        "EXCLUDED_ATTRIBUTES": (IMMUTABLE, "a table of names Protocol checks skip, read only"),
        "_PROTO_ALLOWLIST": (IMMUTABLE, "a table of ABCs Protocol may derive from, read only"),
        "_SPECIAL_NAMES": (IMMUTABLE, "a table of names Protocol checks skip, read only"),
        "_TYPING_INTERNALS": (IMMUTABLE, "a table of names Protocol checks skip, read only"),
        "io.__name__": (IMMUTABLE, "typing.io's name, set once at import (3.11)"),
        "re.__name__": (IMMUTABLE, "typing.re's name, set once at import (3.11)"),
        **_all(IMMUTABLE, _TYPING_ALIAS, (
            "ChainMap", "Counter", "DefaultDict", "Deque", "Dict", "List", "MutableMapping",
            "MutableSequence", "MutableSet", "OrderedDict", "Set",
        )),
    },
    "fractions": {
        "_hash_algorithm": (CLEARED, "lru_cache of Fraction hashes by numerator and denominator (3.12+)"),
    },
    "difflib": {
        "HtmlDiff._default_prefix": (
            UNREACHABLE,
            "the host's table counter; the facade's HtmlDiff counts per namespace instead",
        ),
        "Match._field_defaults": (IMMUTABLE, _FIELD_DEFAULTS),
    },
    "decimal": {"DecimalTuple._field_defaults": (IMMUTABLE, _FIELD_DEFAULTS)},
    "_decimal": {"DecimalTuple._field_defaults": (IMMUTABLE, _FIELD_DEFAULTS)},
    "functools": {
        "_CacheInfo._field_defaults": (IMMUTABLE, _FIELD_DEFAULTS),
        "_convert": (IMMUTABLE, "total_ordering's table of derived methods, read only"),
    },
    "statistics": {
        "LinearRegression._field_defaults": (IMMUTABLE, _FIELD_DEFAULTS),
        "_kernel_invcdfs": (IMMUTABLE, "kernel functions by name (3.13), read only"),
    },
    "dataclasses": {"_hash_action": (IMMUTABLE, "the decision table for __hash__, read only")},
    "copy": _all(IMMUTABLE, "copy's dispatch tables by type, read only (copyreg is not reachable)",
                 ("_copy_dispatch", "_deepcopy_dispatch", "dispatch_table")),
    "base64": _all(
        IMMUTABLE, "an encoding table built on first use, the same whatever the input",
        ("_a85chars", "_a85chars2", "_b32rev", "_b32tab2", "_b85chars", "_b85chars2", "_b85dec"),
    ),
    "datetime": _all(
        IMMUTABLE, "a class constant (min, max, resolution, utc) set once at import",
        ("date.max", "date.min", "date.resolution", "datetime.max", "datetime.min",
         "datetime.resolution", "time.max", "time.min", "time.resolution", "timedelta.max",
         "timedelta.min", "timedelta.resolution", "timezone.max", "timezone.min", "timezone.utc"),
    ),
    "enum": _all(
        IMMUTABLE, "assignments to a local variable named member in enum's own code, not to the class",
        ("member.__objclass__", "member._name_", "member._sort_order_", "member._value_"),
    ),
    "hashlib": _all(
        IMMUTABLE, "the algorithms and constructors this Python has, filled under fixed names",
        ("__block_openssl_constructor", "__builtin_constructor_cache", "algorithms_available",
         "algorithms_guaranteed"),
    ),
    "html": _all(IMMUTABLE, "html.unescape's entity tables, read only",
                 ("_html5", "_invalid_charrefs", "_invalid_codepoints")),
    "html.entities": _all(
        UNREACHABLE, "entity tables of a submodule the html facade does not hand out (html.unescape reads html._html5)",
        ("codepoint2name", "entitydefs", "html5", "name2codepoint"),
    ),
    "io": {"OpenWrapper": (UNREACHABLE, "the io facade holds StringIO and BytesIO only")},
    "json.decoder": _all(IMMUTABLE, "the decoder's escape tables, read only", ("BACKSLASH", "_CONSTANTS")),
    "json.encoder": {"ESCAPE_DCT": (IMMUTABLE, "the encoder's escape table, read only")},
    "pprint": {"PrettyPrinter._dispatch": (IMMUTABLE, "pformat's table of printers by type, read only")},
    "random": {"_sha512": (IMMUTABLE, "hashlib's sha512, imported on first seed(str)")},
    "string": {"_sentinel_dict": (IMMUTABLE, "Template's default argument, never written")},
    "textwrap": {
        "TextWrapper.unicode_whitespace_trans": (
            UNREACHABLE, "the facade's TextWrapper holds a read-only copy of it",
        ),
    },
    "_csv": {"_dialects": (UNREACHABLE, "register_dialect and unregister_dialect are not in the facade")},
    "__future__": {"all_feature_names": (UNREACHABLE, "left out of the __future__ facade")},
    "sys": _all(
        UNREACHABLE, "the sys facade holds maxsize, version_info and getsizeof only",
        ("_xoptions", "argv", "meta_path", "modules", "orig_argv", "path", "path_hooks",
         "path_importer_cache", "warnoptions"),
    ),
    "_asyncio": _all(UNREACHABLE, _TASKS, ("_all_tasks", "_current_tasks", "_eager_tasks", "_scheduled_tasks")),
    "asyncio.tasks": _all(UNREACHABLE, _TASKS, ("_all_tasks", "_current_tasks", "_eager_tasks", "_scheduled_tasks")),
    "asyncio.events": {
        "_event_loop_policy": (UNREACHABLE, "set_event_loop_policy is not in the facade"),
    },
    "asyncio.coroutines": {
        "_iscoroutine_typecache": (
            UNREACHABLE,
            "types iscoroutine has recognised; a cell cannot make a coroutine type of its own "
            "(it cannot define __await__)",
        ),
    },
}  # fmt: skip


def _typing_caches() -> list[Callable[[], None]]:
    # typing registers the cache_clear of each of its caches here (3.11 to 3.13).
    return list(getattr(typing, "_cleanups", ()))


def clear_shared_state() -> None:
    """Empty every piece of module state judged ``CLEARED``: what one REPL's cells may have
    left in the caches of re, _strptime, typing and fractions, for the host and the next
    REPL. Safe from any thread and while other REPLs run: each is a cache, refilled on
    demand."""
    re.purge()
    strptime = _loaded("_strptime")
    if strptime is not None:
        with strptime._cache_lock:
            strptime._regex_cache.clear()
    for clear in _typing_caches():
        clear()
    fractions = _loaded("fractions")
    hashes = getattr(fractions, "_hash_algorithm", None)
    if hashes is not None:
        hashes.cache_clear()


def _loaded(name: str) -> typing.Any:
    # Only what a cell could have used is cleared: a module never imported holds nothing.
    return sys.modules.get(name)
