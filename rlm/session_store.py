"""Sessions that survive the process: an RLMSession's file, written and read back.

What is kept: the questions and answers, the usage so far, and the REPL variables
that are plain data (str, int, float, bool, None, and lists, tuples, dicts, sets and
frozensets of them), each within ``max_var_chars`` of JSON. Every other variable (a
function, a module, an object, one too large) is listed in the file under
``not_saved`` with the reason, so nothing disappears silently.

How, without trusting anything: the variables are encoded *inside the sandbox* by a
small cell (so the process sandbox gives exact types, not a lossy JSON copy) into one
tagged-JSON string that is the only thing read out. The host never unpickles or
imports anything: loading parses JSON, rebuilds the plain values and assigns them in
the new session's REPL through cells made only of Python literals it wrote itself.
Which names to look at comes from the cells the session ran (their top-level
assignments, parsed with ``ast``, never executed here).

This module holds the file format and the encoding of variables; it must not hold the
session itself or open one (``rlm.session`` does, through ``read_session``), so saved
sessions depend on sessions and never the reverse.
"""

from __future__ import annotations

import ast
import builtins
import json
import keyword
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm.errors import ConfigError
from rlm.usage import ModelUsage, Usage

if TYPE_CHECKING:
    # Annotations only: sessions hand themselves in; this module never imports them.
    from rlm.session import RLMSession

__all__ = ["FORMAT", "SavedSession", "assigned_names", "read_session", "save_session"]

FORMAT = "rlm-session"
VERSION = 1
MAX_VAR_CHARS = 1_000_000
# Names the REPL provides itself (or our own helpers): never saved, never restored.
_PROVIDED = frozenset({
    "context", "llm_query", "llm_query_batch", "llm_query_async", "llm_query_batch_async",
    "FINAL", "FINAL_VAR", "print", "SHOW_VARS",
})
_HELPER = "rlm_session_"

# Runs in the sandbox, under its policy: a tagged encoding of plain data, so tuples,
# sets and non-str dict keys survive JSON. Cycles and deep nesting stop at depth 40.
_ENCODER = '''
import json as rlm_session_json_mod_
def rlm_session_enc_(v, depth):
    t = type(v)
    if v is None or t is bool or t is int or t is str:
        return v
    if t is float:
        if v != v or v == float("inf") or v == float("-inf"):
            return {"$f": repr(v)}
        return v
    if depth > 40:
        raise ValueError("nested more than 40 levels deep (or refers to itself)")
    if t is list:
        return [rlm_session_enc_(x, depth + 1) for x in v]
    if t is tuple:
        return {"$t": [rlm_session_enc_(x, depth + 1) for x in v]}
    if t is set:
        return {"$s": [rlm_session_enc_(x, depth + 1) for x in v]}
    if t is frozenset:
        return {"$fs": [rlm_session_enc_(x, depth + 1) for x in v]}
    if t is dict:
        return {"$d": [[rlm_session_enc_(k, depth + 1), rlm_session_enc_(x, depth + 1)]
                       for k, x in v.items()]}
    raise TypeError("not plain data: " + str(t))
rlm_session_out_ = {}
'''

_ONE = '''
try:
    rlm_session_out_[{name!r}] = ["ok", rlm_session_json_mod_.dumps(rlm_session_enc_({name}, 0))]
except NameError:
    pass
except Exception as rlm_session_err_:
    rlm_session_out_[{name!r}] = ["no", str(rlm_session_err_)[:200]]
'''


def assigned_names(code: str) -> set[str]:
    """Names a cell binds at its top level (not inside functions, classes, lambdas or
    comprehensions); an unparsable cell binds nothing."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names: set[str] = set()
    scoped = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
              ast.SetComp, ast.DictComp, ast.GeneratorExp)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(child.name)
                continue
            if isinstance(child, scoped):
                continue
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                names.add(child.id)
            elif isinstance(child, ast.alias):
                names.add((child.asname or child.name).split(".")[0])
            visit(child)

    visit(tree)
    return {n for n in names if n.isidentifier() and not n.startswith("_")
            and n not in _PROVIDED and not n.startswith(_HELPER)}


# Deepest value a session file may hold: the encoder stops at depth 40.
_MAX_DEPTH = 64


def _decode(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"a value nested deeper than {_MAX_DEPTH} levels")
    depth += 1
    if isinstance(value, list):
        return [_decode(x, depth) for x in value]
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError("not a tagged value")
        (tag, inner), = value.items()
        if tag == "$f":
            if inner not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad float {inner!r}")
            return float(inner)
        if tag == "$t":
            return tuple(_decode(x, depth) for x in inner)
        if tag == "$s":
            return {_decode(x, depth) for x in inner}
        if tag == "$fs":
            return frozenset(_decode(x, depth) for x in inner)
        if tag == "$d":
            return {_decode(k, depth): _decode(v, depth) for k, v in inner}
        raise ValueError(f"unknown tag {tag!r}")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"unexpected {type(value).__name__}")


def _literal(value: Any) -> str:
    """Python source for a plain value, written here (never taken from the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(x) for x in value) + "]"
    if isinstance(value, tuple):
        return "(" + "".join(_literal(x) + ", " for x in value) + ")"
    if isinstance(value, frozenset):
        return "frozenset([" + ", ".join(_literal(x) for x in value) + "])"
    if isinstance(value, set):
        return "set([" + ", ".join(_literal(x) for x in value) + "])"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"not plain data: {type(value).__name__}")


def _snapshot(session: RLMSession, names: Iterable[str], max_var_chars: int
              ) -> tuple[dict[str, Any], dict[str, str]]:
    names = sorted(names)
    if not names:
        return {}, {}
    code = _ENCODER + "".join(_ONE.format(name=n) for n in names)
    code += "rlm_session_json_ = rlm_session_json_mod_.dumps(rlm_session_out_)\n"
    result = session.env.execute(code)
    try:
        if result.error:
            raise ConfigError(f"could not read the session's variables: {result.error}")
        raw = session.env.get("rlm_session_json_")
    finally:
        session.env.execute(
            "del rlm_session_enc_, rlm_session_out_, rlm_session_json_mod_\n"
            "try:\n    del rlm_session_json_\nexcept NameError:\n    pass\n"
        )
    if type(raw) is not str:  # in-process, get() returns the REPL's own object
        raise ConfigError("could not read the session's variables: the REPL did not give text")
    found = json.loads(raw)
    if type(found) is not dict:
        raise ConfigError("could not read the session's variables: unexpected shape")
    saved: dict[str, Any] = {}
    unsaved: dict[str, str] = {}
    for name, (status, text) in found.items():
        if status != "ok":
            unsaved[name] = text
        elif len(text) > max_var_chars:
            unsaved[name] = f"larger than the {max_var_chars:,}-character cap ({len(text):,})"
        else:
            saved[name] = json.loads(text)
    return saved, unsaved


def save_session(session: RLMSession, path: str | os.PathLike[str], *,
                 max_var_chars: int = MAX_VAR_CHARS) -> Path:
    """Write ``session`` to ``path`` as JSON (atomically); see the module docstring."""
    # A cell's own `sum = 0` hides a builtin for that session only: loading refuses such
    # names, so they are listed as not saved rather than breaking the file.
    hiding = session.variable_names & _reserved_names(session.rlm.tools)
    saved, unsaved = _snapshot(session, session.variable_names - hiding, max_var_chars)
    unsaved.update({name: "it hides the REPL's own name" for name in sorted(hiding)})
    data = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": session.rlm.model,
        "history": [[q, a] for q, a in session.history],
        "variables": saved,
        "not_saved": unsaved,
        "usage": {k: v.to_dict() for k, v in session.usage.items()},
    }
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, target)
    return target


def _usage(data: Any) -> Usage:
    if not isinstance(data, dict):
        return Usage()
    fields = {k: data[k] for k in ("calls", "prompt_tokens", "completion_tokens", "total_tokens",
                                   "cost_usd", "failed_calls", "retries", "cached_input_tokens",
                                   "cache_creation_tokens", "reasoning_tokens", "batch_calls",
                                   "batch_saved_usd") if k in data}
    by_model = {
        str(name): ModelUsage(**{k: v for k, v in mu.items() if k in ModelUsage.__dataclass_fields__})
        for name, mu in (data.get("by_model") or {}).items() if isinstance(mu, dict)
    }
    return Usage(**fields, by_model=by_model)


def _reserved_names(tools: Iterable[str]) -> frozenset[str]:
    """Names a restored variable may not take: what the REPL provides (its functions,
    the context, the builtins cells see) and the RLM's tools."""
    return frozenset({*_PROVIDED, *dir(builtins), "LLMQueryError", *tools})


@dataclass
class SavedSession:
    """A session file's contents, checked and decoded: ready to restore into a session."""

    history: list[tuple[str, str]]
    usage: dict[str, Usage]
    variables: dict[str, Any]

    def restore(self, session: RLMSession) -> None:
        """Give a new ``session`` the saved history, usage and variables; each variable is
        assigned in its REPL by a cell of Python literals written here."""
        session.history.extend(self.history)
        session.usage = dict(self.usage)
        for name, value in self.variables.items():
            result = session.env.execute(f"{name} = {_literal(value)}\n")
            if result.error:
                raise ConfigError(f"could not restore variable {name!r}: {result.error}")
            session.variable_names.add(name)


def read_session(path: str | os.PathLike[str], tools: Iterable[str] = ()) -> SavedSession:
    """The checked contents of the session file ``path``; raises ``ConfigError`` for a
    file that is not one (missing, not JSON, another format or version, a malformed
    value, or a variable that cannot be restored or would hide a REPL name or one of
    ``tools``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"session file not found: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a saved session (not JSON: {exc})") from exc
    except RecursionError:
        raise ConfigError(f"{path} is not a saved session (its JSON is nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a saved rlm session (no format: {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ConfigError(f"{path} is a session of format version {data.get('version')!r}; "
                          f"this rlm reads version {VERSION}")
    history = data.get("history") or []
    variables = data.get("variables") or {}
    try:
        pairs = [(str(q), str(a)) for q, a in history]
        values = {str(name): _decode(value) for name, value in variables.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path} holds a malformed session: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path} holds a malformed session: a value nested too deeply") from None
    reserved = _reserved_names(tools)
    for name in values:
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith(("_", _HELPER)):
            raise ConfigError(f"{path} holds a variable named {name!r}, which cannot be restored")
        if name in reserved:
            raise ConfigError(
                f"{path} holds a variable named {name!r}, which would hide the REPL's own "
                f"{name!r}; rename it in the file (or delete it) to load the session"
            )
    usage = data.get("usage") or {}
    return SavedSession(
        history=pairs,
        usage={"root": _usage(usage.get("root")), "sub": _usage(usage.get("sub"))},
        variables=values,
    )
