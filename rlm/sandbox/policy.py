"""The sandbox policy shared by both executors: compile, guards, builtins, imports, running.

What this layer does: a cell is parsed, checked and rewritten by a subclass of
RestrictedPython's transformer (which also allows ``await``, ``async def``, ``async
for``, ``async with`` and async comprehensions), instrumented with a cheap deadline
check at the top of every loop body, comprehension and function, and compiled with
top-level await. It runs in a namespace built here: guarded attribute access and
writes, a curated set of builtins (those that consume iterators in C are wrapped so
a deadline stops them), an import allowlist that hands out read-only module facades,
and per-namespace output capture.

Choices worth knowing:

- Deadline: every loop body, comprehension and function entry starts with
  ``if _rlm_stop_: _rlm_timeout_()`` (a global truth test, no call). Builtins that
  drain iterators in C (sum, min, max, sorted, list, tuple, set, frozenset, dict, any,
  all, iter(f, sentinel), functools.reduce) take their input in chunks with a check in
  between, and itertools.count/cycle/repeat are checked generators, so
  ``sum(itertools.count())`` stops too. Not wrapped: ``str.join``, collections.deque
  and Counter constructors, math.fsum/prod, statistics and similar C or stdlib loops
  over a huge *finite* C iterator (``deque(range(10**15), maxlen=0)``).
- Recursion: bounded by the interpreter's own per-thread depth check (the process-wide
  recursion limit, left unchanged) rather than a per-env counter: each env runs on its
  own thread, RecursionError is an ordinary error in the cell, and a counter would
  need try/finally at every function entry (slower calls, awkward for generators).
- Output: ``print`` writes to the namespace's stdout writer; ``print(..., file=f)``
  calls ``f.write`` through the attribute guard, so it only reaches file-like objects
  the code made itself (nothing of the host's, such as sys.stderr, is reachable).
- Items are read and written natively; attribute reads go through ``_getattr_`` except
  for a few everyday methods; attribute writes only reach objects defined in a cell.

What it does not do: it is not a security boundary on its own. A single long C-level
operation (``10**10**8``, a catastrophic regular expression, ``"x" * 10**10``) or a
memory bomb cannot be interrupted in-process, and code shares the host's memory.
The worker-process executor (``rlm.sandbox.process``) adds hard limits from the OS.

API used by both executors::

    cell = compile_cell(source, "<cell 3>")          # raises PolicyError (with .lineno, .hint)
    ns = build_namespace(write_stdout=..., write_stderr=..., extra={...})
    value = run_cell(cell, ns, loop, on_start=lambda stop: ...)   # stop() ends the cell
    text = format_user_error(exc, cell, ns)          # a traceback of the user's lines only
    answer = take_final(ns)                          # what FINAL/FINAL_VAR gave, or None
"""

from __future__ import annotations

import _string  # type: ignore[import-not-found]  # C helpers behind str.format's parser
import abc
import ast
import asyncio
import builtins
import collections
import collections.abc
import concurrent.futures
import dataclasses
import decimal
import functools
import importlib
import itertools
import operator
import pprint as pprint_module
import random as random_module
import string as string_module
import textwrap
import threading
import time as time_module
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from RestrictedPython.transformer import IOPERATOR_TO_STR, RestrictingNodeTransformer

__all__ = [
    "ALLOWED_MODULES",
    "CELL_MODULE",
    "CellStop",
    "CellTimeout",
    "CompiledCell",
    "LLMQueryError",
    "OutputBuffer",
    "PolicyError",
    "SUBQUERY_PARAMS",
    "build_namespace",
    "check_subquery_params",
    "check_subquery_prompt",
    "compile_cell",
    "count_failed_slots",
    "format_user_error",
    "guarded_getattr",
    "run_cell",
    "take_final",
    "wait_for_future",
]

# ``__name__`` of every sandbox namespace: classes and functions defined by user code
# carry it as ``__module__``, which is how the write guard tells them apart from the
# host's (shared) classes and functions.
CELL_MODULE = "__rlm_cell__"

# Internal names live in the namespace; they start with "_", so user code can neither
# read nor rebind them (RestrictedPython rejects such names at compile time).
_STOP = "_rlm_stop_"
_TIMEOUT = "_rlm_timeout_"
_ECHO = "_rlm_last_"
_STATE = "_rlm_state_"
_AUGATTR = "_rlm_augattr_"

# Items consumed per deadline check when a wrapped builtin drains an iterator.
_CHUNK = 4096


class PolicyError(Exception):
    """A cell was refused before running: a SyntaxError or a sandbox rule.

    ``str(err)`` is the full message for the model (location, offending line, reason
    and a one-line hint); ``lineno`` is the 1-based line in the cell or None, ``hint``
    the one-line suggestion on its own.
    """

    def __init__(self, message: str, *, lineno: int | None, hint: str) -> None:
        super().__init__(message)
        self.lineno = lineno
        self.hint = hint


class CellTimeout(BaseException):
    """Raised inside a cell once its deadline has passed (or it was stopped).

    A BaseException so that ``except Exception`` in user code does not swallow it; the
    stop flag stays set until the cell ends, so even ``except BaseException`` only
    delays it to the next loop iteration or function call.
    """


class LLMQueryError(Exception):
    """A sub-query from ``llm_query`` failed; visible to cell code so it can be caught."""


@dataclass(frozen=True)
class CompiledCell:
    """A cell checked and compiled by ``compile_cell``; ``is_async`` if it has top-level await."""

    source: str
    filename: str
    code: types.CodeType
    is_async: bool
    lines: tuple[str, ...]


# --------------------------------------------------------------------------- compile

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

# Everyday container and string methods read natively, without the ``_getattr_`` call
# (which would triple the cost of ``out.append(x)`` in a loop). The name checks are
# static; what the runtime guard adds for other names is a second net that refuses
# any attribute of frames, modules, futures and loops should one ever leak; these
# names give nothing dangerous on any object the sandbox hands out.
_HOT_METHODS = frozenset(
    {"append", "extend", "insert", "pop", "get", "items", "keys", "values", "update",
     "setdefault", "add", "discard", "split", "rsplit", "strip", "lstrip", "rstrip", "join",
     "lower", "upper", "startswith", "endswith", "find", "rfind", "count", "index",
     "splitlines", "group", "groups", "most_common", "isdigit", "isalpha", "isalnum",
     "isspace", "partition", "rpartition", "casefold", "title"}
)  # fmt: skip

_HINT_UNDERSCORE = (
    "names and attributes starting with '_' are off limits in the sandbox; use the public "
    "API instead (for example type(x) rather than x.__class__)"
)
_HINT_INTERNALS = "frames, code objects and generator internals are not reachable from the sandbox"
_HINT_EXEC = "exec, eval and compile are not available; write the code directly in the cell"
_HINT_GENERIC = "rewrite this line with ordinary Python; the sandbox refuses this construct"
_HINT_SYNTAX = "fix the syntax on that line and run the cell again"


# Dunder attributes that only ever hold a str (or None) and that code needs for
# ``type(e).__name__``: readable, never writable.
_READABLE_DUNDERS = frozenset({"__name__", "__qualname__", "__doc__"})
# The public API of namedtuples, which happens to start with "_".
_NAMEDTUPLE_API = frozenset({"_asdict", "_replace", "_fields", "_make", "_field_defaults"})


def _is_blocked_attr(name: str, write: bool = False) -> bool:
    """The name rules for attributes, before any look at the object.

    ``__x`` names are refused (except the readable str dunders, for reading); ``_x``
    names pass here and are then allowed only on objects defined in the REPL (and the
    namedtuple API); interpreter internals are refused.
    """
    if name.startswith("_"):
        if name.startswith("__"):
            return write or name not in _READABLE_DUNDERS
        return False
    return name in BLOCKED_ATTRIBUTES or name.startswith("co_")


class _CellTransformer(RestrictingNodeTransformer):
    """RestrictedPython's checks, plus async syntax, minus guards with no purpose here.

    RestrictedPython was built for Zope, where iteration, unpacking, item access and
    star-calls pass per-object security checks. Here none of those can reach anything
    the object does not already hand out, so they are left as plain bytecode (fast).
    What stays guarded: every name (no leading "_", no rebinding of guards), attribute
    reads (``_getattr_``) and writes (``_write_``, ``_rlm_augattr_``), print, imports
    and class creation (through ``__metaclass__``).
    """

    # -- async: allowed, with their contents visited like everything else.
    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> Any:
        self.check_name(node, node.name, allow_magic_methods=True)
        self.check_function_argument_names(node)
        return self.node_contents_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        self.check_name(node, node.name, allow_magic_methods=True)
        self.check_function_argument_names(node)
        return self.node_contents_visit(node)

    def visit_Await(self, node: ast.Await) -> Any:
        return self.node_contents_visit(node)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> Any:
        return self.node_contents_visit(node)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> Any:
        return self.node_contents_visit(node)

    # -- iteration and unpacking: plain (see the class docstring).
    def visit_For(self, node: ast.For) -> Any:
        return self.node_contents_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> Any:
        return self.node_contents_visit(node)

    def visit_Assign(self, node: ast.Assign) -> Any:
        return self.node_contents_visit(node)

    def visit_With(self, node: ast.With) -> Any:
        return self.node_contents_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> Any:
        # Needed for dataclasses and typed code; target names are checked by visit_Name.
        return self.node_contents_visit(node)

    def visit_Call(self, node: ast.Call) -> Any:
        # RestrictedPython routes *args/**kwargs through _apply_ for Zope's argument
        # guards; keyword names starting with "_" are already legal in plain calls,
        # so star-calls add nothing and stay native.
        if isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval", "compile"):
            self.error(node, f"{node.func.id}() calls are not allowed.")
        return self.node_contents_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> Any:
        # Items are read and written natively, ``counts[k] += 1`` included. An item
        # operation runs the container's own __getitem__/__setitem__: user classes cannot
        # define those (dunder names are refused), module facades export no mutable
        # containers (a test walks them), and nothing reachable holds host state in
        # items. A write guard here would let every item write through anyway, so it
        # would only cost a call per store (2x on a counting loop).
        return self.node_contents_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        attr = node.attr
        load = isinstance(node.ctx, ast.Load)
        if load and _is_super_init(node):
            # ``super().__init__(...)`` binds to the class being defined and its own
            # instance (zero-argument super checks that), so it reaches nothing else.
            return self.node_contents_visit(node)
        if _is_blocked_attr(attr, write=not load):
            if attr.startswith("__"):
                self.error(node, f'"{attr}" is an invalid attribute name because it starts with "_".')
            else:
                self.error(node, f'"{attr}" is an interpreter internal and not accessible.')
            return node
        if load and attr in _HOT_METHODS:  # see _HOT_METHODS
            return self.node_contents_visit(node)
        node = self.node_contents_visit(node)
        if load:
            call = ast.Call(
                func=ast.Name("_getattr_", ast.Load()),
                args=[node.value, ast.Constant(attr)],
                keywords=[],
            )
            ast.copy_location(call, node)
            return ast.fix_missing_locations(call)
        guarded = ast.Call(func=ast.Name("_write_", ast.Load()), args=[node.value], keywords=[])
        ast.copy_location(guarded, node.value)
        node.value = ast.fix_missing_locations(guarded)
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        target = node.target
        if isinstance(target, ast.Name):
            # ``n += 1`` is the same operation as ``n = n + 1``, which is allowed
            # unguarded; RestrictedPython's _inplacevar_ only adds a call per use.
            return self.node_contents_visit(node)
        if isinstance(target, ast.Subscript):
            # ``counts[k] += 1``: a native item update (see visit_Subscript).
            return self.node_contents_visit(node)
        if isinstance(target, ast.Attribute):
            # ``obj.attr += v`` reads and writes the attribute: both must be guarded,
            # so it becomes ``_rlm_augattr_(obj, "attr", "+=", v)``.
            if _is_blocked_attr(target.attr, write=True):
                self.error(node, f'"{target.attr}" is not an accessible attribute name.')
                return node
            call = ast.Call(
                func=ast.Name(_AUGATTR, ast.Load()),
                args=[
                    self.visit(target.value),
                    ast.Constant(target.attr),
                    ast.Constant(IOPERATOR_TO_STR[type(node.op)]),
                    self.visit(node.value),
                ],
                keywords=[],
            )
            new = ast.Expr(call)
            ast.copy_location(new, node)
            ast.fix_missing_locations(new)
            return new
        self.not_allowed(node)
        return node

    def visit_Global(self, node: ast.Global) -> Any:
        for name in node.names:
            self.check_name(node, name)
        return node

    def visit_Nonlocal(self, node: ast.Nonlocal) -> Any:
        # Only rebinds locals of an enclosing function, which user code owns anyway.
        for name in node.names:
            self.check_name(node, name)
        return node

    # -- match statements: allowed; every name they bind and every attribute a class
    # pattern reads by keyword is checked like any other (positional class patterns
    # read the attributes a class lists in __match_args__, which cell code cannot set).
    def visit_Match(self, node: ast.Match) -> Any:
        return self.node_contents_visit(node)

    def visit_match_case(self, node: ast.match_case) -> Any:
        return self.node_contents_visit(node)

    def visit_MatchValue(self, node: ast.MatchValue) -> Any:
        return self.node_contents_visit(node)

    def visit_MatchSingleton(self, node: ast.MatchSingleton) -> Any:
        return self.node_contents_visit(node)

    def visit_MatchSequence(self, node: ast.MatchSequence) -> Any:
        return self.node_contents_visit(node)

    def visit_MatchOr(self, node: ast.MatchOr) -> Any:
        return self.node_contents_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> Any:
        self.check_name(node, node.name)
        return self.node_contents_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> Any:
        self.check_name(node, node.name)
        return self.node_contents_visit(node)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> Any:
        self.check_name(node, node.rest)
        return self.node_contents_visit(node)

    def visit_MatchClass(self, node: ast.MatchClass) -> Any:
        for attr in node.kwd_attrs:
            if attr.startswith("_") or _is_blocked_attr(attr):
                self.error(node, f'"{attr}" cannot be matched as an attribute in the sandbox.')
        return self.node_contents_visit(node)

    def inject_print_collector(self, node: Any, position: int = 0) -> None:
        # ``print`` compiles to ``_print._call_print``; ``_print`` is one per-namespace
        # writer installed as a global, so no per-function collector is needed.
        return None


def _is_super_init(node: ast.Attribute) -> bool:
    value = node.value
    return (
        node.attr == "__init__"
        and isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "super"
        and not value.args
        and not value.keywords
    )


class _DeadlineInjector(ast.NodeTransformer):
    """Adds ``if _rlm_stop_: _rlm_timeout_()`` to loops, functions and comprehensions.

    A global-name truth test costs a load and a jump per iteration, not a call; the
    watchdog flips the flag and the next check raises CellTimeout.
    """

    @staticmethod
    def _check(node: ast.AST) -> ast.If:
        stmt = ast.If(
            test=ast.Name(_STOP, ast.Load()),
            body=[ast.Expr(ast.Call(ast.Name(_TIMEOUT, ast.Load()), [], []))],
            orelse=[],
        )
        ast.copy_location(stmt, node)
        return ast.fix_missing_locations(stmt)

    def _loop(self, node: Any) -> Any:
        self.generic_visit(node)
        node.body.insert(0, self._check(node))
        return node

    visit_For = visit_AsyncFor = visit_While = _loop

    def _function(self, node: Any) -> Any:
        self.generic_visit(node)
        first = node.body[0]
        docstring = (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        )
        node.body.insert(1 if docstring else 0, self._check(first))
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Lambda(self, node: ast.Lambda) -> Any:
        self.generic_visit(node)
        body = ast.IfExp(
            test=ast.Name(_STOP, ast.Load()),
            body=ast.Call(ast.Name(_TIMEOUT, ast.Load()), [], []),
            orelse=node.body,
        )
        ast.copy_location(body, node.body)
        node.body = ast.fix_missing_locations(body)
        return node

    def visit_comprehension(self, node: ast.comprehension) -> Any:
        self.generic_visit(node)
        check = ast.BoolOp(
            op=ast.Or(),
            values=[
                ast.UnaryOp(ast.Not(), ast.Name(_STOP, ast.Load())),
                ast.Call(ast.Name(_TIMEOUT, ast.Load()), [], []),
            ],
        )
        ast.copy_location(check, node.iter)
        node.ifs.insert(0, ast.fix_missing_locations(check))
        return node


def _hint_for(message: str) -> str:
    if "starts with" in message or "starting with" in message:
        return _HINT_UNDERSCORE
    if "internal" in message or "restricted name" in message:
        return _HINT_INTERNALS
    if "Exec" in message or "Eval" in message or "exec()" in message or "eval()" in message or "compile()" in message:
        return _HINT_EXEC
    if "TryStar" in message:
        return "except* is not supported in the sandbox; catch the ExceptionGroup with a plain except"
    if "matched as an attribute" in message:
        return "match on public attributes only, or use if/elif with isinstance"
    if "metaclass" in message:
        return "metaclasses are not available; define an ordinary class"
    if "import" in message:
        return "import modules by name only, for example `import json` or `from math import sqrt`"
    return _HINT_GENERIC


def _location(filename: str, lines: tuple[str, ...], lineno: int | None, col: int | None) -> str:
    out = f'  File "{filename}", line {lineno}' if lineno else f'  File "{filename}"'
    if lineno and 0 < lineno <= len(lines):
        text = lines[lineno - 1]
        stripped = text.lstrip()
        out += "\n    " + stripped
        if col is not None and col > 0:
            caret = max(col - (len(text) - len(stripped)), 0)
            out += "\n    " + " " * caret + "^"
    return out


def _syntax_error(exc: SyntaxError, filename: str, lines: tuple[str, ...]) -> PolicyError:
    lineno = exc.lineno
    message = (
        _location(filename, lines, lineno, exc.offset - 1 if exc.offset else None)
        + f"\n{type(exc).__name__}: {exc.msg}\nhint: {_HINT_SYNTAX}"
    )
    if "outside async function" in (exc.msg or ""):
        hint = "`await` works at the top level of a cell and inside `async def`; mark the function async"
        message = message.rsplit("hint:", 1)[0] + f"hint: {hint}"
        return PolicyError(message, lineno=lineno, hint=hint)
    return PolicyError(message, lineno=lineno, hint=_HINT_SYNTAX)


def compile_cell(source: str, filename: str) -> CompiledCell:
    """Check, rewrite and compile one cell; raise PolicyError if it is refused.

    The source is parsed, checked by the restricted transformer (names, attributes,
    imports, exec/eval, async allowed), instrumented with deadline checks, its trailing
    expression turned into an echo, and compiled with top-level await. SyntaxErrors
    become PolicyError too, with the line, a caret and a hint. ``filename`` should look
    like ``<cell 3>``: tracebacks use it and keep only frames from such files.
    """
    if not isinstance(source, str):
        raise TypeError(f"cell source must be a str, not {type(source).__name__}")
    lines = tuple(source.splitlines())
    try:
        tree = ast.parse(source, filename, mode="exec")
    except SyntaxError as exc:
        raise _syntax_error(exc, filename, lines) from None
    except ValueError as exc:  # source with NUL bytes
        raise PolicyError(
            f"SyntaxError: {exc}", lineno=None, hint="remove NUL characters from the code"
        ) from None
    checker = _CellTransformer()
    tree = checker.visit(tree)
    if checker.errors:
        first = checker.errors[0]
        lineno: int | None = None
        reason = first
        if first.startswith("Line "):
            head, _, reason = first.partition(": ")
            try:
                lineno = int(head[5:])
            except ValueError:
                lineno = None
        hint = _hint_for(reason)
        more = f" ({len(checker.errors) - 1} more problem(s) after this one)" if len(checker.errors) > 1 else ""
        message = (
            _location(filename, lines, lineno, None)
            + f"\nSandboxPolicyError: {reason}{more}\nhint: {hint}"
        )
        raise PolicyError(message, lineno=lineno, hint=hint)
    tree = _DeadlineInjector().visit(tree)
    # At module level names compile to LOAD_NAME; declared global they become
    # LOAD_GLOBAL, which the interpreter caches: the per-iteration check gets cheaper.
    position = 0
    while (
        position < len(tree.body)
        and isinstance(tree.body[position], ast.ImportFrom)
        and tree.body[position].module == "__future__"
    ):
        position += 1
    declare = ast.Global(names=[_STOP, _TIMEOUT, "_getattr_", "_write_", "_print", _AUGATTR, _ECHO])
    tree.body.insert(position, declare)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        echo = ast.Assign(targets=[ast.Name(_ECHO, ast.Store())], value=last.value)
        ast.copy_location(echo, last)
        tree.body[-1] = echo
    ast.fix_missing_locations(tree)
    try:
        code = compile(
            tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
        )
    except SyntaxError as exc:
        raise _syntax_error(exc, filename, lines) from None
    is_async = bool(code.co_flags & 0x80)  # CO_COROUTINE: eval() returns a coroutine
    return CompiledCell(source, filename, code, is_async, lines)


# --------------------------------------------------------------------------- guards


def _refuse_attr(name: str) -> AttributeError:
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
    if name in _READABLE_DUNDERS:
        value = getattr(obj, name)
        if value is None or isinstance(value, str):
            return value
        raise _refuse_attr(name)
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
        raise _refuse_attr(name)
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


def _getattr_(obj: Any, name: str) -> Any:
    """Guard behind every compiled ``a.b`` (the name itself was checked at compile time)."""
    if type(obj) in _DENY_TYPES:
        raise AttributeError(f"{type(obj).__name__} objects are not accessible in the sandbox")
    if name in _TYPE_SENSITIVE or name[0] == "_":
        return _special_getattr(obj, name)
    return getattr(obj, name)


_MISSING: Any = object()


def guarded_getattr(obj: Any, name: str, default: Any = _MISSING) -> Any:
    """``getattr`` as seen by user code: the compile-time name rules applied at run time."""
    if not isinstance(name, str):
        raise TypeError(f"attribute name must be a string, not {type(name).__name__}")
    try:
        if _is_blocked_attr(name):
            raise _refuse_attr(name)
        return _getattr_(obj, name)
    except AttributeError:
        if default is _MISSING:
            raise
        return default


def _hasattr(obj: Any, name: str) -> bool:
    try:
        guarded_getattr(obj, name)
    except AttributeError:
        return False
    return True


_WRITABLE_STDLIB: tuple[type, ...] = (decimal.Context, textwrap.TextWrapper)
_SHARED_CONTEXTS = (decimal.DefaultContext, decimal.BasicContext, decimal.ExtendedContext)


def _attr_writable(ob: Any) -> bool:
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


def _write_(ob: Any) -> Any:
    """Guard behind ``a.b = v`` and ``del a.b`` (RestrictedPython's name for it)."""
    if _attr_writable(ob):
        return ob
    raise _refuse_write(ob)


def _setattr(ob: Any, name: str, value: Any) -> None:
    if not isinstance(name, str) or _is_blocked_attr(name, write=True):
        raise _refuse_attr(str(name))
    if not _attr_writable(ob):
        raise _refuse_write(ob)
    setattr(ob, name, value)


def _delattr(ob: Any, name: str) -> None:
    if not isinstance(name, str) or _is_blocked_attr(name, write=True):
        raise _refuse_attr(str(name))
    if not _attr_writable(ob):
        raise _refuse_write(ob)
    delattr(ob, name)


_INPLACE: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
    ">>=": operator.irshift, "|=": operator.ior, "^=": operator.ixor, "&=": operator.iand,
    "//=": operator.ifloordiv, "@=": operator.imatmul,
}  # fmt: skip


def _augattr(ob: Any, name: str, op: str, value: Any) -> None:
    current = _getattr_(ob, name)
    result = _INPLACE[op](current, value)
    if not _attr_writable(ob):
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


# --------------------------------------------------------------------------- output


class OutputBuffer:
    """Captured text of one stream with a cap: keeps the head and the tail, counts the cut."""

    def __init__(self, limit: int) -> None:
        self.limit = max(int(limit), 0)
        self._head_cap = self.limit // 2
        self._tail_cap = self.limit - self._head_cap
        self._head: list[str] = []
        self._head_len = 0
        self._tail: list[str] = []
        self._tail_len = 0
        self.total = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        """Append ``text`` (a str); beyond the cap only the most recent tail is kept."""
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        n = len(text)
        if not n:
            return 0
        with self._lock:
            self.total += n
            if self._head_len < self._head_cap or self.total <= self.limit:
                room = (self.limit if self.total <= self.limit else self._head_cap) - self._head_len
                take = text[: max(room, 0)]
                self._head.append(take)
                self._head_len += len(take)
                text = text[len(take) :]
                if not text:
                    return n
            self._tail.append(text)
            self._tail_len += len(text)
            if self._tail_len > 2 * self._tail_cap + 4096:
                joined = "".join(self._tail)[-self._tail_cap :] if self._tail_cap else ""
                self._tail = [joined]
                self._tail_len = len(joined)
        return n

    @property
    def truncated(self) -> bool:
        """True when more text was written than the cap allows."""
        return self.total > self.limit

    def getvalue(self) -> str:
        """The captured text, or head + a note of how much was cut + tail."""
        with self._lock:
            head = "".join(self._head)
            tail = "".join(self._tail)
            if self.total <= self.limit:
                return head + tail
            # The head may be longer than half when everything fitted until the last write.
            head = head[: self._head_cap] if self._head_cap else ""
            tail = tail[-self._tail_cap :] if self._tail_cap else ""
            cut = self.total - len(head) - len(tail)
            return f"{head}\n... [{cut:,} characters truncated] ...\n{tail}"


class _Printer:
    """The object behind ``print`` in a namespace (RestrictedPython calls ``_print._call_print``)."""

    __slots__ = ("_write",)

    def __init__(self, write: Callable[[str], Any]) -> None:
        self._write = write

    def _call_print(
        self, *args: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None,
        flush: bool = False,
    ) -> None:
        if sep is None:
            sep = " "
        if end is None:
            end = "\n"
        if not isinstance(sep, str) or not isinstance(end, str):
            raise TypeError("sep and end must be None or a string")
        text = sep.join([str(a) for a in args]) + end
        if file is None:
            self._write(text)
        else:
            # A file-like object the user made (a class with a write method); nothing
            # of the host's is reachable to pass here.
            guarded_getattr(file, "write")(text)

    def __call__(self) -> str:
        # RestrictedPython's ``printed``; output goes straight to the cell's stdout.
        return ""


# --------------------------------------------------------------------------- state


class _CellState:
    """Per-namespace bookkeeping behind the internal names (unreachable from user code)."""

    __slots__ = (
        "gen", "running", "stop_reason", "stop_event", "task", "loop", "final", "has_final",
        "reserved", "sources", "waiters", "write_stdout", "write_stderr", "lock",
    )  # fmt: skip

    def __init__(self, write_stdout: Callable[[str], Any], write_stderr: Callable[[str], Any]) -> None:
        self.gen = 0
        self.running = False
        self.stop_reason: str | None = None
        self.stop_event = threading.Event()
        self.task: asyncio.Task[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.final: str | None = None
        self.has_final = False
        self.reserved: dict[str, Any] = {}
        self.sources: dict[str, tuple[str, ...]] = {}
        self.waiters: set[threading.Event] = set()
        self.write_stdout = write_stdout
        self.write_stderr = write_stderr
        self.lock = threading.Lock()


class CellStop:
    """Handle that stops one running cell; handed to ``run_cell``'s ``on_start``.

    Calling it (from any thread) sets the namespace's stop flag so the next loop
    iteration or function call raises CellTimeout, wakes a cell blocked in a
    sub-query or ``time.sleep``, and cancels an awaiting top-level-await cell. It is a
    no-op once that cell has ended, so a late watchdog cannot stop the next cell.
    """

    def __init__(self, ns: dict[str, Any], gen: int) -> None:
        self._ns = ns
        self._gen = gen

    def __call__(self, reason: str = "the cell was stopped") -> None:
        state: _CellState = self._ns[_STATE]
        with state.lock:
            if state.gen != self._gen or not state.running:
                return
            if state.stop_reason is None:
                state.stop_reason = reason
            self._ns[_STOP] = True
            state.stop_event.set()
            for waiter in list(state.waiters):
                waiter.set()
            task, loop = state.task, state.loop
        if task is not None and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed in between
                pass

    @property
    def generation(self) -> int:
        """Which run of the namespace this handle belongs to."""
        return self._gen


def _make_timeout(ns: dict[str, Any]) -> Callable[[], None]:
    def timeout() -> None:
        state: _CellState = ns[_STATE]
        if not state.running:
            # User functions called outside a cell (by the host, a finaliser, another
            # thread holding a reference) are inert: the flag is set between cells.
            raise CellTimeout("sandbox code can only run inside a cell")
        raise CellTimeout(state.stop_reason or "the cell was stopped")

    return timeout


def wait_for_future(ns: dict[str, Any], future: concurrent.futures.Future[Any]) -> Any:
    """Block the cell's thread until ``future`` is done or the cell is stopped.

    Used by the sync ``llm_query`` forms (the sub-query runs on another loop or
    process); if the cell's deadline passes first, the future is cancelled and
    CellTimeout raised, so a timed-out cell never stays stuck in a wait.
    """
    state: _CellState = ns[_STATE]
    woken = threading.Event()
    future.add_done_callback(lambda _f: woken.set())
    with state.lock:
        state.waiters.add(woken)
    try:
        while not woken.wait(1.0):  # a periodic recheck costs nothing and guards lost wakeups
            if ns[_STOP]:
                break
        if ns[_STOP] and state.running and not future.done():
            future.cancel()
            _make_timeout(ns)()
        if ns[_STOP] and not state.running:
            future.cancel()
            _make_timeout(ns)()
        return future.result()
    finally:
        with state.lock:
            state.waiters.discard(woken)


# --------------------------------------------------------------------------- builtins


def _check_stop(ns: dict[str, Any]) -> None:
    if ns[_STOP]:
        _make_timeout(ns)()


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
        _check_stop(ns)


def _chunks(ns: dict[str, Any], iterable: Iterable[Any]) -> Iterator[list[Any]]:
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
        _check_stop(ns)


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
            for chunk in _chunks(self._ns, src):
                out.update(chunk)
            out.update(kwargs)
            return out
        if real is _real_set or real is _real_frozenset:
            acc: set[Any] = set()
            for chunk in _chunks(self._ns, src):
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
        return getattr(self._real, name)

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
        if name.startswith("_") and name not in ("__name__", "__qualname__"):
            raise AttributeError(name)
        return getattr(self._real, name)

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
    "open": "there is no file access; the data is in `context`",
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


def _make_builtins(ns: dict[str, Any], importer: Callable[..., Any]) -> dict[str, Any]:
    b: dict[str, Any] = {name: getattr(builtins, name) for name in _PLAIN_BUILTINS}
    b.update({name: getattr(builtins, name) for name in _EXCEPTIONS if hasattr(builtins, name)})
    b["LLMQueryError"] = LLMQueryError
    b["__build_class__"] = builtins.__build_class__
    b["__import__"] = importer
    for name, why in _ABSENT.items():
        b[name] = _unavailable(name, why)

    views: dict[type, Any] = {}
    for real in (list, tuple, set, frozenset, dict):
        views[real] = b[real.__name__] = _ConsumingType(real, ns)
    type_view = _TypeView(_real_type, views)
    views[_real_type] = b["type"] = type_view

    def check() -> None:
        if ns[_STOP]:
            _make_timeout(ns)()

    def sum(iterable: Iterable[Any], /, start: Any = 0) -> Any:  # noqa: A001
        total = start
        for chunk in _chunks(ns, iterable):
            total = builtins.sum(chunk, total)
        return total

    def _extreme(pick: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 1:
            return pick(*args, **kwargs)
        key = kwargs.get("key")
        default = kwargs.get("default", _MISSING)
        best: list[Any] = []
        for chunk in _chunks(ns, args[0]):
            if chunk:
                best.append(pick(chunk, key=key))
        if not best:
            if default is _MISSING:
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
        return _checked_iter(ns, builtins.iter(obj, *sentinel))

    def anext(iterator: Any, *default: Any) -> Any:  # noqa: A001
        # A coroutine rather than the raw awaitable: the raw one is iterable and would
        # hand out the event loop's futures to a plain ``for`` loop.
        async def step() -> Any:
            if default:
                return await builtins.anext(iterator, *default)
            return await builtins.anext(iterator)

        return step()

    def dir(*args: Any) -> list[str]:  # noqa: A001
        if not args:
            return builtins.sorted(k for k in ns if not k.startswith("_"))
        return [n for n in builtins.dir(args[0]) if not n.startswith("_")]

    b.update(
        sum=sum, min=min, max=max, sorted=sorted, any=any, all=all, iter=iter, anext=anext,
        dir=dir, getattr=guarded_getattr, hasattr=_hasattr, setattr=_setattr, delattr=_delattr,
    )
    return b


def _checked_iter(ns: dict[str, Any], it: Iterator[Any]) -> Iterator[Any]:
    for item in it:
        if ns[_STOP]:
            _make_timeout(ns)()
        yield item


# --------------------------------------------------------------------------- imports


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
    "base64", "bisect", "collections", "collections.abc", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "fractions", "functools", "hashlib", "heapq", "html",
    "itertools", "json", "math", "operator", "pprint", "random", "re", "statistics",
    "string", "textwrap", "time", "typing", "unicodedata", "__future__",
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
    "csv": {"register_dialect", "unregister_dialect", "field_size_limit"},
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
        frozen = _real_type(cls.__name__, (cls,), {**mutable, "__module__": cls.__module__})
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
    for a in attrs:
        if not isinstance(a, str):
            raise TypeError("attribute name must be a string")
        for part in a.split("."):
            if _is_blocked_attr(part):
                raise _refuse_attr(part)

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
    if not isinstance(name, str) or _is_blocked_attr(name):
        raise _refuse_attr(str(name))

    def methodcaller(obj: Any) -> Any:
        return guarded_getattr(obj, name)(*args, **kwargs)

    return methodcaller


def _user_class_only(what: str, cls: Any) -> None:
    if not _attr_writable(cls):
        raise TypeError(
            f"{what} can only be applied to classes and functions defined in the REPL "
            "(it would change a shared one for every REPL and the host)"
        )


def _safe_dataclass(cls: Any = None, /, **kwargs: Any) -> Any:
    def wrap(c: Any) -> Any:
        _user_class_only("dataclass", c)
        return dataclasses.dataclass(c, **kwargs)

    return wrap if cls is None else wrap(cls)


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
    elif name == "operator":
        attrs = _exports(operator, name)
        attrs.update(attrgetter=_safe_attrgetter, methodcaller=_safe_methodcaller)
    elif name == "dataclasses":
        attrs = _exports(dataclasses, name, deny={"make_dataclass"})
        attrs["dataclass"] = _safe_dataclass
    elif name == "string":
        attrs = _exports(string_module, name, deny={"Formatter"})
        attrs["Formatter"] = SafeFormatter
    else:
        attrs = _exports(importlib.import_module(name), name)
    return ModuleFacade(name, attrs)


def _env_facade(name: str, ns: dict[str, Any]) -> ModuleFacade:
    """Facades whose functions need this namespace: its deadline, RNG or output."""
    state: _CellState = ns[_STATE]
    if name == "random":
        rng = random_module.Random()  # per namespace: seeding one REPL does not affect another
        attrs: dict[str, Any] = {n: getattr(rng, n) for n in _RANDOM_METHODS if hasattr(rng, n)}
        attrs.update(Random=random_module.Random, SystemRandom=random_module.SystemRandom)
        return ModuleFacade(name, attrs)
    if name == "time":
        attrs = {n: getattr(time_module, n) for n in _TIME_NAMES if hasattr(time_module, n)}

        def sleep(seconds: float) -> None:
            if seconds < 0:
                raise ValueError("sleep length must be non-negative")
            if state.stop_event.wait(seconds) or ns[_STOP]:
                _make_timeout(ns)()

        attrs["sleep"] = sleep
        return ModuleFacade(name, attrs)
    if name == "pprint":

        def pprint(obj: Any, stream: Any = None, **kwargs: Any) -> None:
            text = pprint_module.pformat(obj, **kwargs) + "\n"
            if stream is None:
                state.write_stdout(text)
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
            return _checked_iter(ns, itertools.count(start, step))

        def cycle(iterable: Iterable[Any]) -> Iterator[Any]:
            return _checked_iter(ns, itertools.cycle(iterable))

        def repeat(obj: Any, *times: Any) -> Iterator[Any]:
            if times:
                return itertools.repeat(obj, *times)
            return _checked_iter(ns, itertools.repeat(obj))

        attrs.update(count=count, cycle=cycle, repeat=repeat)
        return ModuleFacade(name, attrs)
    if name == "functools":
        attrs = _exports(functools, name, deny={"singledispatch", "singledispatchmethod"})

        def reduce(function: Callable[[Any, Any], Any], iterable: Iterable[Any], *initial: Any) -> Any:
            chunks = _chunks(ns, iterable)
            if initial:
                acc = initial[0]
            else:
                acc = _MISSING
            for chunk in chunks:
                if acc is _MISSING:
                    if not chunk:
                        continue
                    acc = functools.reduce(function, chunk)
                else:
                    acc = functools.reduce(function, chunk, acc)
            if acc is _MISSING:
                raise TypeError("reduce() of empty iterable with no initial value")
            return acc

        attrs.update(
            reduce=reduce, total_ordering=_safe_total_ordering,
            update_wrapper=_safe_update_wrapper, wraps=_safe_wraps,
        )
        return ModuleFacade(name, attrs)
    raise KeyError(name)


_PER_NAMESPACE = frozenset({"random", "time", "pprint", "itertools", "functools"})


# Modules that C functions of allowed modules import lazily while a cell runs.
_C_IMPORTS = frozenset({"_strptime"})


def _import_refusal(name: str) -> ImportError:
    allowed = ", ".join(m for m in ALLOWED_MODULES if m != "__future__")
    return ImportError(
        f"import of {name!r} is not allowed in the sandbox. Allowed modules: {allowed}. "
        "Files, the network, processes and the interpreter are out of reach by design; "
        "the data is in `context` and sub-queries go through llm_query"
    )


def _make_importer(ns: dict[str, Any]) -> Callable[..., Any]:
    cache: dict[str, ModuleFacade] = {}

    def facade(name: str) -> ModuleFacade:
        got = cache.get(name)
        if got is None:
            got = _env_facade(name, ns) if name in _PER_NAMESPACE else _static_facade(name)
            cache[name] = got
        return got

    def __import__(  # noqa: N807 - this is the import hook
        name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
    ) -> ModuleFacade:
        if type(fromlist) is list and name in _C_IMPORTS:
            # C code of an allowed module importing its helper (datetime.strptime needs
            # _strptime) through the current builtins. Import statements in cells pass a
            # tuple or None, never a list, so only C callers get the real module.
            return importlib.import_module(name)
        if level:
            raise ImportError("relative imports are not available in the sandbox")
        if not isinstance(name, str) or name not in ALLOWED_MODULES:
            raise _import_refusal(str(name))
        if fromlist or "." not in name:
            return facade(name)
        return facade(name.split(".")[0])

    return __import__


# --------------------------------------------------------------------------- namespace


def build_namespace(
    *,
    write_stdout: Callable[[str], Any],
    write_stderr: Callable[[str], Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a fresh sandbox namespace whose output goes to the given writers.

    ``write_stdout``/``write_stderr`` receive str chunks (``print`` and echoes go to
    stdout; notes such as a restored reserved name to stderr); swap what they point to
    per cell to capture per cell. ``extra`` adds names (``context``, the llm_query
    family, tools): with FINAL and FINAL_VAR they are reserved, so if a cell rebinds
    or deletes one it is restored when the cell ends. Builtins, guards and the import
    hook are installed here; the namespace is inert (its functions refuse to run)
    until ``run_cell`` runs a cell in it.
    """
    ns: dict[str, Any] = {}
    state = _CellState(write_stdout, write_stderr)
    ns[_STATE] = state
    ns[_STOP] = True
    ns[_TIMEOUT] = _make_timeout(ns)
    ns["__builtins__"] = _make_builtins(ns, _make_importer(ns))
    ns["__name__"] = CELL_MODULE
    ns["__metaclass__"] = _real_type
    ns["_getattr_"] = _getattr_
    ns["_write_"] = _write_
    ns[_AUGATTR] = _augattr
    ns["_print"] = _Printer(lambda text: state.write_stdout(text))

    def FINAL(answer: Any) -> None:  # noqa: N802 - the name the prompts use
        state.final = answer if isinstance(answer, str) else str(answer)
        state.has_final = True

    def FINAL_VAR(name: Any) -> None:  # noqa: N802
        if not isinstance(name, str):
            raise TypeError("FINAL_VAR takes the variable's name as a string, e.g. FINAL_VAR('answer')")
        key = name.strip().strip("'\"").strip()
        if not key.isidentifier() or key.startswith("_") or key not in ns:
            raise NameError(
                f"FINAL_VAR({name!r}): there is no variable named {key!r} in the REPL; "
                "assign it first, or call FINAL(value) directly"
            )
        value = ns[key]
        state.final = value if isinstance(value, str) else str(value)
        state.has_final = True

    reserved: dict[str, Any] = {"FINAL": FINAL, "FINAL_VAR": FINAL_VAR}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"namespace name {key!r} must be an identifier not starting with '_'")
        reserved[key] = value
    ns.update(reserved)
    state.reserved = reserved
    return ns


def _restore_reserved(ns: dict[str, Any]) -> list[str]:
    state: _CellState = ns[_STATE]
    restored = []
    for name, obj in state.reserved.items():
        if ns.get(name, _MISSING) is not obj:
            ns[name] = obj
            restored.append(name)
    return restored


def run_cell(
    cell: CompiledCell,
    ns: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    *,
    on_start: Callable[[CellStop], Any] | None = None,
) -> Any:
    """Run a compiled cell in ``ns`` on the calling thread; echo and return its last value.

    ``loop`` is a private event loop owned by the calling thread (never the engine loop
    or the caller's loop): top-level-await cells run to completion on it. ``on_start``
    receives the CellStop for this run right after the stop flag is cleared, for a
    watchdog to call at the deadline. A trailing expression's repr (unless None) is
    written to the namespace's stdout, like a REPL, and returned. User exceptions
    propagate unchanged (format them with ``format_user_error``); a deadline surfaces
    as CellTimeout even if user code swallowed it. Reserved names are restored on the
    way out (with a note on stderr).
    """
    state: _CellState = ns[_STATE]
    with state.lock:
        state.gen += 1
        gen = state.gen
        state.stop_reason = None
        state.stop_event.clear()
        state.final = None
        state.has_final = False
        state.running = True
        state.loop = loop
        state.sources[cell.filename] = cell.lines
        ns[_STOP] = False
    stop = CellStop(ns, gen)
    try:
        if on_start is not None:
            on_start(stop)
        ns.pop(_ECHO, None)
        result = eval(cell.code, ns)  # noqa: S307 - compiled by compile_cell under the policy
        if cell.is_async:
            if ns[_STOP]:
                result.close()
                _make_timeout(ns)()
            task = loop.create_task(result)
            state.task = task
            try:
                loop.run_until_complete(task)
            except asyncio.CancelledError:
                if state.stop_reason is not None:
                    raise CellTimeout(state.stop_reason) from None
                raise
            finally:
                state.task = None
        value = ns.pop(_ECHO, None)
        if state.stop_reason is not None:
            raise CellTimeout(state.stop_reason)
        if value is not None:
            state.write_stdout(_echo_text(value) + "\n")
        return value
    finally:
        with state.lock:
            if state.gen == gen:
                ns[_STOP] = True
                state.running = False
                state.task = None
        restored = _restore_reserved(ns)
        if restored:
            names = ", ".join(restored)
            one = len(restored) == 1
            state.write_stderr(
                f"note: {names} {'is' if one else 'are'} reserved in this REPL and "
                f"{'was' if one else 'were'} restored; use another variable name\n"
            )


def _echo_text(value: Any) -> str:
    if isinstance(value, str) and len(value) > 200_000:
        # Do not build a second copy of a huge string just to truncate it afterwards.
        return repr(value[:100_000])[:-1] + f"...[{len(value) - 200_000:,} chars]..." + repr(value[-100_000:])[1:]
    return repr(value)


def take_final(ns: dict[str, Any]) -> str | None:
    """Return the answer given to FINAL/FINAL_VAR in the last cell (a str), or None."""
    state: _CellState = ns[_STATE]
    if not state.has_final:
        return None
    answer, state.final, state.has_final = state.final, None, False
    return answer


def stop_requested(ns: dict[str, Any]) -> bool:
    """True while no cell runs or after the running cell was told to stop."""
    return bool(ns[_STOP])


# --------------------------------------------------------------------------- sub-queries

# Request parameters code may pass to llm_query & co. They go into the request body; the
# list keeps out anything the client itself would interpret (callbacks, return_exceptions,
# transport options), whatever a given SubQueries implementation does with them.
SUBQUERY_PARAMS = frozenset(
    {"model", "temperature", "max_tokens", "max_completion_tokens", "top_p", "stop", "seed",
     "presence_penalty", "frequency_penalty", "response_format", "reasoning_effort",
     "logit_bias", "n"}
)  # fmt: skip

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
        if not _json_like(value):
            raise TypeError(f"llm_query parameter {key!r} must be plain data (str, number, list, dict)")


def count_failed_slots(results: list[Any]) -> int:
    """How many items of an llm_query_batch result are ``[llm_query error: ...]`` strings."""
    return builtins.sum(
        1 for r in results if isinstance(r, str) and r.startswith(FAILED_SLOT_PREFIX)
    )


# --------------------------------------------------------------------------- errors

_HINTS: dict[type[BaseException], str] = {
    RecursionError: "recursion depth is bounded (Python's recursion limit); use a loop or an explicit stack",
    SystemExit: "exit() and SystemExit only end this cell; the REPL keeps its variables. To finish, call FINAL(answer)",
    KeyboardInterrupt: "KeyboardInterrupt only ends this cell; the REPL keeps its variables",
    MemoryError: "the cell ran out of memory; work on smaller slices of the data",
}


def format_user_error(exc: BaseException, cell: CompiledCell, ns: dict[str, Any] | None = None) -> str:
    """Describe a failed cell for the model: the user's frames only, then the error.

    Frames are kept when they come from a cell of this namespace (``ns``; otherwise only
    from ``cell``), shown with their source line, so no host path or library internals
    appear. PolicyError gives its own message; CellTimeout becomes a TimeoutError line
    naming where the cell was stopped.
    """
    if isinstance(exc, PolicyError):
        return str(exc)
    sources: dict[str, tuple[str, ...]] = {cell.filename: cell.lines}
    if ns is not None and _STATE in ns:
        sources = {**ns[_STATE].sources, cell.filename: cell.lines}
    frames = []
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if filename in sources:
            frames.append((filename, lineno, frame.f_code.co_name))
    if isinstance(exc, CellTimeout):
        where = ""
        if frames:
            filename, lineno, _ = frames[-1]
            lines = sources[filename]
            text = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
            where = f" (stopped in {filename} at line {lineno}: {text})"
        return (
            f"TimeoutError: {exc}{where}. Variables assigned before that point keep their "
            "values; make the code faster or process the data in smaller parts"
        )
    out = ["Traceback (most recent call last):"]
    # Like Python's own traceback: a run of identical frames (deep recursion) shows
    # three times and then a count; very long stacks keep their two ends.
    collapsed: list[tuple[str, int, str] | str] = []
    run = 0
    for i, item in enumerate(frames):
        run = run + 1 if i and item == frames[i - 1] else 1
        if run <= 3:
            collapsed.append(item)
        elif i + 1 == len(frames) or frames[i + 1] != item:
            collapsed.append(f"  [Previous line repeated {run - 3} more times]")
    if len(collapsed) > 24:
        cut = len(collapsed) - 20
        collapsed = [*collapsed[:10], f"  [... {cut} more frames ...]", *collapsed[-10:]]
    for entry in collapsed:
        if isinstance(entry, str):
            out.append(entry)
            continue
        filename, lineno, name = entry
        out.append(f'  File "{filename}", line {lineno}, in {name}')
        lines = sources[filename]
        if 0 < lineno <= len(lines):
            out.append("    " + lines[lineno - 1].strip())
    last = _exception_line(exc)
    if len(last) > 4000:
        last = last[:2000] + f" ...[{len(last) - 4000:,} chars]... " + last[-2000:]
    out.append(last)
    for kind, hint in _HINTS.items():
        if isinstance(exc, kind):
            out.append(f"hint: {hint}")
            break
    return "\n".join(out)


def _exception_line(exc: BaseException) -> str:
    # Like traceback.format_exception_only, but without module prefixes: the model sees
    # "LLMQueryError: ..." and "MyError: ...", not rlm.sandbox.policy / __rlm_cell__ paths.
    name = type(exc).__qualname__
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a user object whose str() fails
        message = "<exception str() failed>"
    line = f"{name}: {message}" if message else name
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        line += "".join(f"\n{note}" for note in notes if isinstance(note, str))
    return line
