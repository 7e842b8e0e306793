"""The compile-time half of the sandbox policy: check, rewrite and compile one cell.

A cell is parsed, checked and rewritten by a subclass of RestrictedPython's transformer
(which also allows ``await``, ``async def``, ``async for``, ``async with`` and async
comprehensions), instrumented with a cheap deadline check at the top of every loop
body, comprehension and function, its trailing expression turned into an echo, and
compiled with top-level await. Refusals and SyntaxErrors become ``PolicyError`` with
the line, a caret and a one-line hint for the model.

The rewritten code calls into the namespace that ``rlm.sandbox.cells`` builds through
the names below (all start with "_", so cell code can neither read nor rebind them).
"""

from __future__ import annotations

import ast
import threading
import types
from dataclasses import dataclass
from typing import Any

from RestrictedPython.transformer import IOPERATOR_TO_STR, RestrictingNodeTransformer

from rlm.sandbox.guards import is_blocked_attr

__all__ = [
    "ASYNC_DEF_HOOK",
    "AUGATTR_HOOK",
    "ECHO_SLOT",
    "GETATTR_HOOK",
    "MATCH_CLASS_HOOK",
    "PRINT_HOOK",
    "STOP_FLAG",
    "TIMEOUT_HOOK",
    "WRITE_HOOK",
    "CompiledCell",
    "PolicyError",
    "compile_cell",
]

# The contract between compiled code and its namespace. RestrictedPython fixes the
# names of the attribute guards and the print collector; the others are ours.
STOP_FLAG = "_rlm_stop_"  # truthy while no cell runs or once the cell must stop
TIMEOUT_HOOK = "_rlm_timeout_"  # called when the flag is seen: raises CellTimeout
ECHO_SLOT = "_rlm_last_"  # receives the value of a trailing expression
AUGATTR_HOOK = "_rlm_augattr_"  # ``obj.attr op= v``
GETATTR_HOOK = "_getattr_"  # every ``a.b`` read
WRITE_HOOK = "_write_"  # every ``a.b = v`` / ``del a.b``
PRINT_HOOK = "_print"  # ``print(...)`` compiles to ``_print._call_print(...)``
MATCH_CLASS_HOOK = "_rlm_match_class_"  # the class of every class pattern goes through it
ASYNC_DEF_HOOK = "_rlm_async_"  # decorates every coroutine function (``async def`` without yield)
_MATCH_TEMP = "_rlm_mc{}_"  # where a match statement keeps its guarded pattern classes


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



@dataclass(frozen=True)
class CompiledCell:
    """A cell checked and compiled by ``compile_cell``; ``is_async`` if it has top-level await."""

    source: str
    filename: str
    code: types.CodeType
    is_async: bool
    lines: tuple[str, ...]



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


class _CellTransformer(RestrictingNodeTransformer):
    """RestrictedPython's checks, plus async syntax, minus guards with no purpose here.

    RestrictedPython was built for Zope, where iteration, unpacking, item access and
    star-calls pass per-object security checks. Here none of those can reach anything
    the object does not already hand out, so they are left as plain bytecode (fast).
    What stays guarded: every name (no leading "_", no rebinding of guards), attribute
    reads (``_getattr_``) and writes (``_write_``, ``_rlm_augattr_``), print, imports
    and class creation (through ``__metaclass__``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._match_classes = 0  # numbers the temporaries of guarded class patterns

    # -- async: allowed, with their contents visited like everything else.
    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> Any:
        self.check_name(node, node.name, allow_magic_methods=True)
        self.check_function_argument_names(node)
        node = self.node_contents_visit(node)
        if not _yields(node):
            # Innermost decorator: calls return coroutines made only when awaited, so one
            # never awaited leaves no "was never awaited" warning on the host.
            hook = ast.copy_location(ast.Name(ASYNC_DEF_HOOK, ast.Load()), node)
            node.decorator_list.append(hook)
        return node

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
        if is_blocked_attr(attr, write=not load):
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
                func=ast.Name(GETATTR_HOOK, ast.Load()),
                args=[node.value, ast.Constant(attr)],
                keywords=[],
            )
            ast.copy_location(call, node)
            return ast.fix_missing_locations(call)
        guarded = ast.Call(func=ast.Name(WRITE_HOOK, ast.Load()), args=[node.value], keywords=[])
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
            if is_blocked_attr(target.attr, write=True):
                self.error(node, f'"{target.attr}" is not an accessible attribute name.')
                return node
            call = ast.Call(
                func=ast.Name(AUGATTR_HOOK, ast.Load()),
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
    # pattern reads by keyword is checked like any other. The class of a class pattern
    # is evaluated before the statement through the match-class guard (a pattern
    # cannot contain a call), which judges what positional sub-patterns read through
    # ``__match_args__`` and the values every read yields (see guards._MatchGate).
    def visit_Match(self, node: ast.Match) -> Any:
        node = self.node_contents_visit(node)
        prelude: list[ast.stmt] = []
        temps: list[str] = []
        for case in node.cases:
            for pattern in ast.walk(case.pattern):
                if not isinstance(pattern, ast.MatchClass):
                    continue
                temp = _MATCH_TEMP.format(self._match_classes)
                self._match_classes += 1
                temps.append(temp)
                guarded = ast.Call(
                    func=ast.Name(MATCH_CLASS_HOOK, ast.Load()),
                    args=[
                        pattern.cls,
                        ast.Constant(len(pattern.patterns)),
                        ast.Constant(tuple(pattern.kwd_attrs)),
                    ],
                    keywords=[],
                )
                assign = ast.Assign(targets=[ast.Name(temp, ast.Store())], value=guarded)
                ast.copy_location(assign, node)
                prelude.append(ast.fix_missing_locations(assign))
                pattern.cls = ast.copy_location(ast.Name(temp, ast.Load()), pattern.cls)
        if not prelude:
            return node
        # The temporaries are cleared afterwards: in a class body they would otherwise
        # stay behind as attributes of the class.
        cleanup: list[ast.stmt] = [
            ast.Assign(targets=[ast.Name(temp, ast.Store())], value=ast.Constant(None))
            for temp in temps
        ]
        guarded_match = ast.Try(body=[*prelude, node], handlers=[], orelse=[], finalbody=cleanup)
        ast.copy_location(guarded_match, node)
        return ast.fix_missing_locations(guarded_match)

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
            if attr.startswith("_") or is_blocked_attr(attr):
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
            test=ast.Name(STOP_FLAG, ast.Load()),
            body=[ast.Expr(ast.Call(ast.Name(TIMEOUT_HOOK, ast.Load()), [], []))],
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
            test=ast.Name(STOP_FLAG, ast.Load()),
            body=ast.Call(ast.Name(TIMEOUT_HOOK, ast.Load()), [], []),
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
                ast.UnaryOp(ast.Not(), ast.Name(STOP_FLAG, ast.Load())),
                ast.Call(ast.Name(TIMEOUT_HOOK, ast.Load()), [], []),
            ],
        )
        ast.copy_location(check, node.iter)
        node.ifs.insert(0, ast.fix_missing_locations(check))
        return node


def _yields(function: ast.AsyncFunctionDef) -> bool:
    """True for an async generator: a yield in the function's own scope (not a nested one)."""
    todo: list[ast.AST] = list(function.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        todo.extend(ast.iter_child_nodes(node))
    return False


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


# Some CPython releases (3.11.7 here) keep the AST converters' recursion depth per
# interpreter, not per thread: two threads converting ASTs at once (two in-process REPLs
# starting a cell together, when a garbage collection inside the conversion switches
# threads) failed with "SystemError: AST constructor recursion depth mismatch". Converting
# one tree at a time costs microseconds.
_AST_LOCK = threading.Lock()


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
        with _AST_LOCK:
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
    declare = ast.Global(names=[STOP_FLAG, TIMEOUT_HOOK, GETATTR_HOOK, WRITE_HOOK, PRINT_HOOK, AUGATTR_HOOK, ECHO_SLOT])
    tree.body.insert(position, declare)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        echo = ast.Assign(targets=[ast.Name(ECHO_SLOT, ast.Store())], value=last.value)
        ast.copy_location(echo, last)
        tree.body[-1] = echo
    ast.fix_missing_locations(tree)
    try:
        with _AST_LOCK:
            code = compile(
                tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
            )
    except SyntaxError as exc:
        raise _syntax_error(exc, filename, lines) from None
    is_async = bool(code.co_flags & 0x80)  # CO_COROUTINE: eval() returns a coroutine
    return CompiledCell(source, filename, code, is_async, lines)

