"""What cells leave in the stdlib's module state: judged, cleared, and never poisoning.

The audit walks every module whose code a cell can run (the allowed modules, their
submodules and C accelerators, the modules of everything their facades hand out, and
the helpers C code imports for them) and lists its mutable state: containers and
caches held at module level or by its classes, and names its own source rebinds at run
time (``global x``, ``SomeClass.counter += 1``). Each must be judged in
``rlm.sandbox.shared_state.JUDGED``. The attacks then try to plant forged keys in re's
and _strptime's caches, park memory in typing's and read difflib's counter, in every
sandbox, and check the next REPL (and, in-process, the host) sees nothing of it.
"""

from __future__ import annotations

import ast
import collections
import datetime
import difflib
import enum
import gc
import importlib
import inspect
import re
import sys
import types
import typing
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rlm_support import wait_until

from rlm import REPLEnv
from rlm.sandbox.cells import build_namespace
from rlm.sandbox.guards import CELL_MODULE
from rlm.sandbox.modules import ALLOWED_MODULES, C_IMPORTS
from rlm.sandbox.process import ProcessExecutor
from rlm.sandbox.shared_state import (
    CLEARED,
    ENUM_TABLES,
    IMMUTABLE,
    JUDGED,
    UNREACHABLE,
    clear_shared_state,
)
from rlm.sandbox.worker_pool import WorkerPool

# --------------------------------------------------------------------------- the walk

_VALUES = (int, float, complex, str, bytes, bool, type(None), range, type(Ellipsis),
           type(NotImplemented))  # fmt: skip
_CONTAINERS = (dict, list, set, bytearray, collections.deque, weakref.WeakValueDictionary,
               weakref.WeakKeyDictionary, weakref.WeakSet)  # fmt: skip
_CODE = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         types.WrapperDescriptorType, types.MethodDescriptorType, types.ClassMethodDescriptorType,
         types.GetSetDescriptorType, types.MemberDescriptorType, types.MethodWrapperType,
         staticmethod, classmethod, property)  # fmt: skip


def _constant(value: Any) -> bool:
    if isinstance(value, _VALUES):
        return True
    if type(value) in (tuple, frozenset):
        return all(_constant(item) for item in value)
    return False


def _mutable(value: Any) -> bool:
    """A container, a cache or an object that can be cleared or written item by item."""
    if isinstance(value, type) or _constant(value) or isinstance(value, (*_CODE, enum.Enum)):
        return False
    if hasattr(value, "cache_clear") or isinstance(value, _CONTAINERS):
        return True
    return hasattr(value, "clear") or hasattr(value, "__setitem__")


def reachable_modules() -> list[str]:
    """Every module whose code a cell can run, as the sandbox is today."""
    names = set(ALLOWED_MODULES) | set(C_IMPORTS)
    for name in list(names):
        importlib.import_module(name)
    ns = build_namespace(write_stdout=lambda text: None, write_stderr=lambda text: None)
    importer = ns["__builtins__"]["__import__"]
    for name in ALLOWED_MODULES:
        if name == "__future__":
            continue
        facade = importer(name, None, None, ("x",), 0)
        for attr in dir(facade):
            owner = getattr(getattr(facade, attr), "__module__", None)
            if isinstance(owner, str) and owner in sys.modules and not owner.startswith("rlm."):
                names.add(owner)
    for loaded in list(sys.modules):
        for name in ALLOWED_MODULES:
            top = name.split(".")[0]
            if loaded.startswith((name + ".", "_" + top + ".")) or loaded == "_" + top:
                names.add(loaded)
    return sorted(names)


def findings(module: types.ModuleType) -> dict[str, str]:
    """The mutable state of one module, by name (``Class.attr`` for class attributes)."""
    out: dict[str, str] = {}
    modname = module.__name__
    for name, value in vars(module).items():
        if name.startswith("__") and name.endswith("__"):
            continue
        if _mutable(value):
            out[name] = type(value).__name__
        if isinstance(value, type) and value.__module__ == modname:
            for attr, held in vars(value).items():
                dunder = attr.startswith("__") and attr.endswith("__")
                if _mutable(held) and (not dunder or hasattr(held, "cache_clear")):
                    out[f"{name}.{attr}"] = type(held).__name__
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return out  # a C module: its globals above are all there is to see
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            for name in node.names:
                out.setdefault(name, "rebound at run time")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign):
            targets = [node.target]
        for target in targets:
            if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    and target.value.id in classes):  # fmt: skip
                out.setdefault(f"{target.value.id}.{target.attr}", "rebound at run time")
    return out


def _is_enum_table(module: types.ModuleType, entry: str) -> bool:
    owner, _, attr = entry.partition(".")
    return isinstance(getattr(module, owner, None), enum.EnumType) and attr in ENUM_TABLES


def unjudged(modules: list[str]) -> list[str]:
    out = []
    for name in modules:
        module = sys.modules[name]
        judged = JUDGED.get(name, {})
        for entry, kind in findings(module).items():
            if entry not in judged and not _is_enum_table(module, entry):
                out.append(f"{name}: {entry} ({kind})")
    return out


def test_every_mutable_global_of_a_module_cells_reach_is_judged() -> None:
    missing = unjudged(reachable_modules())
    assert missing == [], "judge these in rlm/sandbox/shared_state.py:\n" + "\n".join(missing)


def test_every_judgement_has_a_verdict_and_a_reason() -> None:
    for name, entries in JUDGED.items():
        for entry, (verdict, reason) in entries.items():
            assert verdict in (CLEARED, IMMUTABLE, UNREACHABLE), (name, entry)
            assert len(reason) > 20, (name, entry)


def test_the_walk_reaches_the_modules_cells_use_through_c_code_and_facades() -> None:
    modules = reachable_modules()
    for name in ("re", "re._parser", "_strptime", "typing", "difflib", "enum", "_json"):
        assert name in modules
    assert "os" not in modules and "subprocess" not in modules
    assert {"_cache", "_compile_repl" if sys.version_info < (3, 12) else "_compile_template"} <= set(
        findings(re)
    )


def test_the_walk_fails_on_a_new_mutable_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(difflib, "_recent_tables", {}, raising=False)
    assert unjudged(["difflib"]) == ["difflib: _recent_tables (dict)"]


def test_the_walk_sees_counters_a_module_rebinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "counting_mod.py").write_text(
        "class Table:\n    made = 0\n    def make(self):\n        Table.made += 1\n"
        "_calls = 0\ndef call():\n    global _calls\n    _calls += 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("counting_mod")
    try:
        assert findings(module) == {"Table.made": "rebound at run time", "_calls": "rebound at run time"}
    finally:
        sys.modules.pop("counting_mod", None)


def _emptied(value: Any) -> bool:
    if hasattr(value, "cache_info"):
        return value.cache_info().currsize == 0
    if isinstance(value, list) and all(callable(f) for f in value):  # typing._cleanups
        return all(f.__self__.cache_info().currsize == 0 for f in value)
    if isinstance(value, dict) and all(hasattr(v, "cache_info") for v in value.values()):
        return all(v.cache_info().currsize == 0 for v in value.values())  # typing._caches
    return len(value) == 0


def test_clear_shared_state_empties_everything_judged_cleared() -> None:
    import fractions
    import time

    re.findall(r"(\d+) USD", "5 USD")
    re.sub("(a)", r"\1\1", "a")
    time.strptime("2024", "%Y")
    typing.Literal["judged"]
    typing.Dict[str, int]  # noqa: UP006 - typing's own alias cache
    hash(fractions.Fraction(1, 3))
    clear_shared_state()
    checked = 0
    for name, entries in JUDGED.items():
        module = sys.modules.get(name)
        for entry, (verdict, _) in entries.items():
            if verdict != CLEARED or module is None or not hasattr(module, entry):
                continue
            assert _emptied(getattr(module, entry)), f"{name}.{entry}"
            checked += 1
    assert checked >= 4


# --------------------------------------------------------------------------- attacks

# Each technique tries to plant a key that passes for r"(\d+) USD" (or for "%Y-%m-%d") in
# re's (or _strptime's) cache, with a value compiled from something else.
FORGE = {
    "str-subclass-unsafe-hash": (
        "import dataclasses, re\n@dataclasses.dataclass(unsafe_hash=True)\nclass Key(str):\n"
        "    def __eq__(self, other):\n        return (x for x in ())\n"
        "re.compile(Key(r'(\\d+) EUR'))"
    ),
    "int-flags-frozen-dataclass": (
        "import dataclasses, re\n@dataclasses.dataclass(frozen=True)\nclass Flags(int):\n"
        "    pass\nre.compile(r'(\\d+) USD', Flags(re.X))"
    ),
    "int-flags-mixin": (
        "import re\nclass Yes:\n    def __eq__(self, other):\n        return True\n"
        "class Flags(Yes, int):\n    pass\nre.compile(r'(\\d+) USD', Flags(re.X))"
    ),
    "enum-functional-flags": (
        "import enum, re\nF = enum.Enum('F', {'X': 64, '__eq__': lambda s, o: True}, type=int)\n"
        "re.compile(r'(\\d+) USD', F.X)"
    ),
    "enum-body-format": (
        "import enum, time\nclass Fmt(str, enum.Enum):\n    DAY_FIRST = '%Y-%d-%m'\n"
        "    def __eq__(self, other):\n        return True\n"
        "time.strptime('2024-04-03', Fmt.DAY_FIRST)"
    ),
    "namedtuple-key": (
        "import typing\nclass Key(typing.NamedTuple):\n    a: str\n"
        "    def __eq__(self, other):\n        return True\ntyping.Literal[Key('x')]"
    ),
}

CHECK = (
    "import re, datetime\n"
    "print(re.findall(r'(\\d+) USD', '5 USD and 7 USD'), "
    "datetime.datetime.strptime('2024-03-04', '%Y-%m-%d').month)"
)


def _host_is_clean() -> None:
    assert re.findall(r"(\d+) USD", "5 USD and 7 USD") == ["5", "7"]
    assert datetime.datetime.strptime("2024-03-04", "%Y-%m-%d").month == 3


@pytest.mark.parametrize("name", list(FORGE))
def test_a_forged_key_is_refused_and_poisons_nothing(
    name: str, sandbox: str, make_env: Callable[..., REPLEnv]
) -> None:
    attacker = make_env(timeout=10.0)
    r = attacker.execute(FORGE[name])
    assert r.error is not None and ("not allowed" in r.error or "not available" in r.error), r.error
    for env in (attacker, make_env(timeout=10.0)):
        out = env.execute(CHECK)
        assert out.error is None, out.error
        assert out.stdout == "['5', '7'] 3\n"
    _host_is_clean()


def test_an_in_process_repl_leaves_nothing_in_stdlib_caches_when_closed() -> None:
    env = REPLEnv(context="c", sandbox="local", timeout=10)
    try:
        r = env.execute(
            "import re, time, typing, dataclasses\nclass S(str):\n    pass\n"
            "@dataclasses.dataclass(frozen=True)\nclass Holder:\n    blob: str\n"
            "held = Holder('x' * 100_000)\n"
            "re.compile(S(r'zz(\\d+)'))\ntime.strptime('2024', S('%Y'))\nT = typing.Literal[held]"
        )
        assert r.error is None, r.error
        held = weakref.ref(env.get("held"))

        def cell_keys() -> list[Any]:
            import _strptime

            compiled = [*re._cache, *getattr(re, "_cache2", {})]
            keys = [k for k in compiled if CELL_MODULE in repr(k[0])]
            return keys + [k for k in list(_strptime._regex_cache) if type(k).__module__ == CELL_MODULE]

        assert len(cell_keys()) >= 2  # the cell's keys are there while it lives
    finally:
        env.close()
    gc.collect()
    assert cell_keys() == []
    assert held() is None  # typing's Literal cache let it go


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool()
    yield p
    p.close()


def _pooled(pool: WorkerPool) -> ProcessExecutor:
    ex = ProcessExecutor(context="ctx", worker_pool=pool, _allow_raw=True)
    ex.start()
    return ex


# Written outside the policy (as code that escaped it would): a key that passes for
# (str, r"(\d+) USD", 0) in re's cache and for "%Y-%m-%d" in _strptime's.
PLANT = r"""
import re, _strptime, datetime
re.purge()  # what the worker cached at start would otherwise answer first
_strptime._regex_cache.clear()
class Flags(int):
    def __hash__(self):
        return hash(0)
    def __eq__(self, other):
        return True
re.compile(r'(\d+) USD', Flags(re.X))
class Fmt(str):
    def __hash__(self):
        return hash('%Y-%m-%d')
    def __eq__(self, other):
        return True
datetime.datetime.strptime('2024-04-03', Fmt('%Y-%d-%m'))
import rlm.sandbox.worker as w
w.pool_test_mark = 'planted'
result = [re.findall(r'(\d+) USD', '5 USD and 7 USD'), datetime.datetime.strptime('2024-03-04', '%Y-%m-%d').month]
"""


def test_a_warm_worker_resets_poisoned_caches_before_the_next_repl(pool: WorkerPool) -> None:
    a = _pooled(pool)
    poisoned = a._run_raw(PLANT).value
    assert poisoned == [[], 4]  # the plant works inside the REPL that made it
    a.close()
    wait_until(lambda: pool.stats()["idle"] >= 1, 10)
    b = _pooled(pool)
    try:
        assert b._run_raw("import rlm.sandbox.worker as w\nresult = w.pool_test_mark").value == "planted"
        out = b.execute(CHECK, 10)
        assert out.error is None, out.error
        assert out.stdout == "['5', '7'] 3\n"
    finally:
        b.close()


def test_a_warm_worker_keeps_no_typing_cache_entry_of_the_last_repl(pool: WorkerPool) -> None:
    a = _pooled(pool)
    r = a.execute(
        "import typing, dataclasses\n@dataclasses.dataclass(frozen=True)\nclass Holder:\n"
        "    blob: str\nT = typing.Literal[Holder('A-secret' * 1000)]", 10
    )
    assert r.error is None, r.error
    count = (
        "import typing\nresult = sum(1 for f in typing._cleanups "
        "for k in [f.__self__.cache_info().currsize] if k)"
    )
    assert a._run_raw(count).value >= 1
    a.close()
    wait_until(lambda: pool.stats()["idle"] >= 1, 10)
    b = _pooled(pool)
    try:
        assert pool.stats()["reused"] == 1
        assert b._run_raw(count).value == 0
    finally:
        b.close()


def test_html_diff_anchors_are_numbered_per_repl(make_env: Callable[..., REPLEnv]) -> None:
    host_before = difflib.HtmlDiff._default_prefix
    first, second = make_env(), make_env()
    make = "import difflib\nt = difflib.HtmlDiff().make_table(['a'], ['b'])\n"
    prefix = "print([p for p in ('from0_', 'from1_', 'from2_') if p in t])"
    for _ in range(2):
        assert first.execute(make).error is None
    assert first.execute(make + prefix).stdout == "['from2_']\n"
    assert second.execute(make + prefix).stdout == "['from0_']\n"
    assert difflib.HtmlDiff._default_prefix == host_before
