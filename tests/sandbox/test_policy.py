"""The policy module on its own: the API both executors build on, and its invariants.

These run the policy directly in this process (no executor): compile_cell, the
namespace, run_cell with a private loop, CellStop, OutputBuffer, and a walk over every
module facade showing that no attribute chain reaches a module, the interpreter's
internals or a mutable container shared with the host.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

from rlm.sandbox.cells import (
    CellTimeout,
    OutputBuffer,
    build_namespace,
    format_user_error,
    run_cell,
    take_final,
)
from rlm.sandbox.compiler import PolicyError, compile_cell
from rlm.sandbox.guards import guarded_getattr
from rlm.sandbox.modules import ALLOWED_MODULES, ModuleFacade


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def out() -> OutputBuffer:
    return OutputBuffer(10_000)


@pytest.fixture
def ns(out: OutputBuffer) -> dict[str, Any]:
    return build_namespace(write_stdout=out.write, write_stderr=out.write, extra={"context": "ctx"})


def test_compile_cell_marks_top_level_await(ns: dict[str, Any]) -> None:
    assert compile_cell("x = 1", "<cell 1>").is_async is False
    assert compile_cell("async def f():\n    return 1\nx = await f()", "<cell 2>").is_async is True


def test_policy_error_carries_line_and_hint() -> None:
    with pytest.raises(PolicyError) as info:
        compile_cell("a = 1\n\nb = a.__class__", "<cell 7>")
    assert info.value.lineno == 3
    assert info.value.hint.startswith("names and attributes starting with '_'")
    assert '"<cell 7>", line 3' in str(info.value)


def test_syntax_error_is_a_policy_error_with_line() -> None:
    with pytest.raises(PolicyError) as info:
        compile_cell("x = (1,\ny = 2", "<cell 1>")
    assert info.value.lineno is not None
    assert "SyntaxError" in str(info.value)


def test_await_in_a_plain_function_gets_a_specific_hint() -> None:
    with pytest.raises(PolicyError) as info:
        compile_cell("def f():\n    await g()", "<cell 1>")
    assert "async def" in info.value.hint


def test_run_cell_echoes_and_returns_the_last_value(
    ns: dict[str, Any], out: OutputBuffer, loop: asyncio.AbstractEventLoop
) -> None:
    value = run_cell(compile_cell("xs = [1, 2]\nxs + [len(context)]", "<cell 1>"), ns, loop)
    assert value == [1, 2, 3]
    assert out.getvalue() == "[1, 2, 3]\n"


def test_run_cell_drives_top_level_await_on_the_given_loop(
    ns: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> None:
    cell = compile_cell("async def f(x):\n    return x * 2\nawait f(21)", "<cell 1>")
    assert run_cell(cell, ns, loop) == 42


def test_cell_stop_ends_a_running_cell(ns: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    cell = compile_cell("n = 0\nwhile True:\n    n += 1", "<cell 1>")

    def arm(stop: Any) -> None:
        threading.Timer(0.2, stop, args=("deadline reached",)).start()

    with pytest.raises(CellTimeout, match="deadline reached") as info:
        run_cell(cell, ns, loop, on_start=arm)
    assert ns["n"] > 0
    message = format_user_error(info.value, cell, ns)
    assert message.startswith("TimeoutError: deadline reached (stopped in <cell 1> at line 2: while True:)")


def test_a_late_stop_does_not_touch_the_next_cell(
    ns: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> None:
    handles: list[Any] = []
    run_cell(compile_cell("a = 1", "<cell 1>"), ns, loop, on_start=handles.append)
    handles[0]("too late")
    assert run_cell(compile_cell("a + 1", "<cell 2>"), ns, loop) == 2


def test_final_is_taken_once(ns: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    run_cell(compile_cell("FINAL(7)", "<cell 1>"), ns, loop)
    assert take_final(ns) == 7
    assert take_final(ns) is None


def test_namespace_functions_are_inert_between_cells(
    ns: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> None:
    run_cell(compile_cell("def f():\n    return 1", "<cell 1>"), ns, loop)
    with pytest.raises(CellTimeout, match="only run inside a cell"):
        ns["f"]()


def test_output_buffer_keeps_head_and_tail() -> None:
    buf = OutputBuffer(20)
    for i in range(100):
        buf.write(f"{i:03d}")
    assert buf.truncated
    assert buf.getvalue() == "0000010020\n... [280 characters truncated] ...\n6097098099"


def test_output_buffer_under_the_cap_is_exact() -> None:
    buf = OutputBuffer(20)
    buf.write("hello ")
    buf.write("world")
    assert (buf.getvalue(), buf.truncated) == ("hello world", False)


def test_guarded_getattr_refuses_internals() -> None:
    gen = (x for x in [1])
    for obj, name in ((gen, "gi_frame"), (1, "__class__"), (len, "__self__"), (type, "mro")):
        with pytest.raises(AttributeError):
            guarded_getattr(obj, name)
    assert guarded_getattr(gen, "gi_frame", "default") == "default"


# -- the facades -----------------------------------------------------------------------

_FORBIDDEN = tuple(
    m for m in (sys, sys.modules.get("os"), sys.modules.get("builtins"), sys.modules.get("importlib"),
                sys.modules.get("inspect")) if m is not None
)  # fmt: skip
_INTERNAL = (types.FrameType, types.CodeType, types.TracebackType, types.ModuleType,
             asyncio.AbstractEventLoop)  # fmt: skip
_MUTABLE = (dict, list, set, bytearray, collections.deque)


def _facades() -> dict[str, ModuleFacade]:
    ns = build_namespace(write_stdout=lambda t: None, write_stderr=lambda t: None)
    importer = ns["__builtins__"]["__import__"]
    return {name: importer(name, None, None, ("x",), 0) for name in ALLOWED_MODULES}


def _walk(obj: Any, path: str, depth: int, seen: set[int], found: list[str]) -> None:
    if isinstance(obj, _INTERNAL) or any(obj is m or obj is vars(m) for m in _FORBIDDEN):
        found.append(f"{path}: {type(obj).__name__}")
        return
    if isinstance(obj, type) and issubclass(obj, type):
        # A metaclass (the real ``type`` included) would create classes with any dunders.
        found.append(f"{path}: metaclass {obj.__name__}")
        return
    if depth >= 3 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, complex)):
        return
    seen.add(id(obj))
    try:
        names = [n for n in dir(obj) if not n.startswith("__")]
    except Exception:  # noqa: BLE001 - an object whose dir() fails has nothing to walk
        return
    for name in names:
        try:
            value = guarded_getattr(obj, name)
            again = guarded_getattr(obj, name)
        except Exception:  # noqa: BLE001 - refused or failing attributes lead nowhere
            continue
        if type(value) in _MUTABLE and value is again:
            found.append(f"{path}.{name}: shared {type(value).__name__}")
        _walk(value, f"{path}.{name}", depth + 1, seen, found)


def test_no_attribute_chain_from_a_facade_reaches_the_host() -> None:
    found: list[str] = []
    seen: set[int] = set()
    for name, facade in _facades().items():
        assert isinstance(facade, ModuleFacade)
        _walk(facade, name, 0, seen, found)
    assert found == []


def test_facades_hold_no_modules_and_no_mutable_values() -> None:
    for name, facade in _facades().items():
        for attr in dir(facade):
            value = getattr(facade, attr)
            assert not isinstance(value, types.ModuleType), f"{name}.{attr}"
            assert type(value) not in _MUTABLE, f"{name}.{attr}"


def test_facades_have_no_name_for_the_import_fallback() -> None:
    # ``from m import x`` falls back to sys.modules[m.__name__ + "." + x] when x is
    # missing; a facade without __name__ makes that fallback fail.
    for facade in _facades().values():
        with pytest.raises(AttributeError):
            facade.__name__  # noqa: B018


def test_facades_are_read_only() -> None:
    json = _facades()["json"]
    with pytest.raises(AttributeError):
        json.dumps = print
    with pytest.raises(AttributeError):
        ModuleFacade.__init__(json, "json", {"dumps": print})
    assert json.dumps([1]) == "[1]"
