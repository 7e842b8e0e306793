"""Running cells: the namespace, the deadline, output capture, FINAL and the error text.

``build_namespace`` makes a fresh namespace (builtins, guards, import hook, output
writers, reserved names such as FINAL); ``run_cell`` runs a compiled cell in it on the
calling thread, with a ``CellStop`` handle a watchdog calls at the deadline; and
``format_user_error`` turns an exception into the short traceback of the user's own
lines the model reads.

Choices worth knowing:

- Deadline: every loop body, comprehension and function entry starts with
  ``if _rlm_stop_: _rlm_timeout_()`` (a global truth test, no call; see
  ``rlm.sandbox.compiler``), and builtins that drain iterators in C take their input
  in chunks with a check in between (``rlm.sandbox.safe_builtins``). Not wrapped:
  ``str.join``, collections.deque and Counter constructors, math.fsum/prod, statistics
  and similar C or stdlib loops over a huge *finite* C iterator
  (``deque(range(10**15), maxlen=0)``).
- Recursion: bounded by the interpreter's own per-thread depth check (the process-wide
  recursion limit, left unchanged) rather than a per-env counter: each env runs on its
  own thread, RecursionError is an ordinary error in the cell, and a counter would
  need try/finally at every function entry (slower calls, awkward for generators).
- Output: ``print`` writes to the namespace's stdout writer; ``print(..., file=f)``
  calls ``f.write`` through the attribute guard, so it only reaches file-like objects
  the code made itself (nothing of the host's, such as sys.stderr, is reachable).

What the policy does not do: it is not a security boundary on its own. A single long
C-level operation (``10**10**8``, a catastrophic regular expression, ``"x" * 10**10``)
or a memory bomb cannot be interrupted in-process, and code shares the host's memory.
The worker-process executor (``rlm.sandbox.process``) adds hard limits from the OS.

API used by both executors::

    cell = compile_cell(source, "<cell 3>")          # rlm.sandbox.compiler; raises PolicyError
    ns = build_namespace(write_stdout=..., write_stderr=..., extra={...})
    value = run_cell(cell, ns, loop, on_start=lambda stop: ...)   # stop() ends the cell
    text = format_user_error(exc, cell, ns)          # a traceback of the user's lines only
    answer = take_final(ns)                          # what FINAL/FINAL_VAR gave, or None
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import traceback
from collections.abc import Callable
from typing import Any

from rlm.sandbox.asyncio_facade import CellTasks, deferring
from rlm.sandbox.boundary import guard_host_function
from rlm.sandbox.compiler import (
    ASYNC_DEF_HOOK,
    AUGATTR_HOOK,
    ECHO_SLOT,
    GETATTR_HOOK,
    MATCH_CLASS_HOOK,
    PRINT_HOOK,
    STOP_FLAG,
    TIMEOUT_HOOK,
    WRITE_HOOK,
    CompiledCell,
    PolicyError,
)
from rlm.sandbox.guards import (
    CELL_MODULE,
    MISSING,
    augattr_guard,
    build_class,
    getattr_guard,
    guarded_getattr,
    make_match_class_guard,
    write_guard,
)
from rlm.sandbox.modules import make_importer
from rlm.sandbox.plaindata import PlainDataError, exact_str, to_plain_data
from rlm.sandbox.safe_builtins import builtin_standins, make_builtins
from rlm.sandbox.shared_state import clear_shared_state

__all__ = [
    "CellStop",
    "CellTimeout",
    "OutputBuffer",
    "build_namespace",
    "format_user_error",
    "run_cell",
    "stop_requested",
    "take_final",
    "timeout_reason",
    "wait_for_future",
]

# Where the per-namespace state lives in the namespace (unreachable: it starts with "_").
_STATE = "_rlm_state_"


class CellTimeout(BaseException):
    """Raised inside a cell once its deadline has passed (or it was stopped).

    A BaseException so that ``except Exception`` in user code does not swallow it; the
    stop flag stays set until the cell ends, so even ``except BaseException`` only
    delays it to the next loop iteration or function call.
    """


def timeout_reason(timeout: float | None) -> str:
    """Why a cell was stopped, as its error says: its time limit, or a stop request."""
    return f"the cell ran longer than its {timeout:g} s time limit" if timeout else "the cell was stopped"



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
        if type(text) is not str:
            # The buffer's text reaches the host: keep no object of the cell's in it.
            text = exact_str(text, "write() argument")
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
        if type(sep) is not str or type(end) is not str:
            # A str subclass's own join/__add__ would hand back whatever it likes.
            sep, end = exact_str(sep), exact_str(end)
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
        "reserved", "sources", "waiters", "write_stdout", "write_stderr", "lock", "tasks",
    )  # fmt: skip

    def __init__(self, write_stdout: Callable[[str], Any], write_stderr: Callable[[str], Any]) -> None:
        self.gen = 0
        self.running = False
        self.stop_reason: str | None = None
        self.stop_event = threading.Event()
        self.task: asyncio.Task[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.final: Any = None
        self.has_final = False
        self.reserved: dict[str, Any] = {}
        self.sources: dict[str, tuple[str, ...]] = {}
        self.waiters: set[threading.Event] = set()
        self.write_stdout = write_stdout
        self.write_stderr = write_stderr
        self.lock = threading.Lock()
        self.tasks = CellTasks()  # asyncio.create_task's, cancelled when their cell ends


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
            self._ns[STOP_FLAG] = True
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
            if ns[STOP_FLAG]:
                break
        if ns[STOP_FLAG]:
            # Stopped, whether or not the answer arrived meanwhile: a run's deadline stops
            # the cell and cancels its sub-queries at once, and the cancelled batch may come
            # back first; the cell must not go on with it.
            future.cancel()
            _make_timeout(ns)()
        return future.result()
    finally:
        with state.lock:
            state.waiters.discard(woken)


def build_namespace(
    *,
    write_stdout: Callable[[str], Any],
    write_stderr: Callable[[str], Any],
    extra: dict[str, Any] | None = None,
    file_access: bool = False,
    data_modules: tuple[str, ...] = (),
    on_data_import: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Build a fresh sandbox namespace whose output goes to the given writers.

    ``write_stdout``/``write_stderr`` receive str chunks (``print`` and echoes go to
    stdout; notes such as a restored reserved name to stderr); swap what they point to
    per cell to capture per cell. ``extra`` adds names (``context``, the llm_query
    family, tools): with FINAL and FINAL_VAR they are reserved, so if a cell rebinds
    or deletes one it is restored when the cell ends. Builtins, guards and the import
    hook are installed here; the namespace is inert (its functions refuse to run)
    until ``run_cell`` runs a cell in it. ``file_access`` (the real ``open``) and
    ``data_modules`` (real numpy/pandas/yaml) are for a confined worker process only;
    ``on_data_import`` is told each time one is imported.
    """
    ns: dict[str, Any] = {}
    state = _CellState(write_stdout, write_stderr)
    ns[_STATE] = state
    ns[STOP_FLAG] = True
    ns[TIMEOUT_HOOK] = _make_timeout(ns)

    def sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        if state.stop_event.wait(seconds) or ns[STOP_FLAG]:
            _make_timeout(ns)()

    importer = make_importer(
        ns,
        sleep=sleep,
        write_stdout=lambda text: state.write_stdout(text),
        tasks=state.tasks,
        cell_loop=lambda: state.loop,
        data_modules=data_modules,
        on_data_import=on_data_import,
    )
    builtins_dict = make_builtins(ns, importer, file_access=file_access)
    ns["__builtins__"] = builtins_dict
    standins = builtin_standins(builtins_dict)
    ns["__name__"] = CELL_MODULE
    ns["__metaclass__"] = build_class
    ns[MATCH_CLASS_HOOK] = make_match_class_guard(standins)
    ns[GETATTR_HOOK] = getattr_guard
    ns[WRITE_HOOK] = write_guard
    ns[AUGATTR_HOOK] = augattr_guard
    ns[ASYNC_DEF_HOOK] = _defer_coroutine_function
    ns[PRINT_HOOK] = _Printer(lambda text: state.write_stdout(text))

    def FINAL(answer: Any) -> None:  # noqa: N802 - the name the prompts use
        state.final = final_value(answer)
        state.has_final = True

    def FINAL_VAR(name: Any) -> None:  # noqa: N802
        # The name as an exact str: a str subclass's strip() could name another variable.
        given = exact_str(name) if issubclass(type(name), str) else None
        key = given.strip().strip("'\"").strip() if given is not None else None
        # Models often pass the value itself (FINAL_VAR(answer)), which is what they mean:
        # anything but a str, a str that cannot be a name, or the very object a variable
        # holds (`is`, so a misspelt name literal is still reported as unknown).
        passed_value = (
            key is None
            or not key.isidentifier()
            or (key not in ns and any(v is name for k, v in ns.items() if not k.startswith("_")))
        )
        if passed_value:
            state.write_stderr(
                "note: FINAL_VAR got a value, not a variable name; it was taken as FINAL(value)\n"
            )
            FINAL(name)
            return
        if key.startswith("_") or key not in ns:
            raise NameError(
                f"FINAL_VAR({given!r}): there is no variable named {key!r} in the REPL; "
                f"assign it first, or if {given!r} is the answer itself, call FINAL({given!r})"
            )
        FINAL(ns[key])

    def drain(iterable: Any) -> list[Any]:
        return builtins_dict["list"](iterable)

    reserved: dict[str, Any] = {"FINAL": FINAL, "FINAL_VAR": FINAL_VAR}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"namespace name {key!r} must be an identifier not starting with '_'")
        reserved[key] = value if key == "context" else guard_host_function(key, value, drain)
    ns.update(reserved)
    state.reserved = reserved
    return ns


def _defer_coroutine_function(fn: Any) -> Any:
    # The cell's own async def: its calls return coroutines made when awaited (see
    # asyncio_facade.deferred). Still the cell's function: attributes may be set on it.
    if not inspect.iscoroutinefunction(fn):
        return fn
    return deferring(fn, module=CELL_MODULE)


def final_value(answer: Any) -> Any:
    """What FINAL stores: plain data the host can keep and validate without running cell code.

    A str (a subclass too) becomes an exact ``str``. JSON-compatible data (dict with str
    keys, list, tuple, int, float, bool, and their subclasses) is copied into exact
    builtin types by ``plaindata.to_plain_data``, so none of its methods run. Anything
    else (an object of a class the cell defined, a set, None, data past the size caps)
    goes through ``str()`` while the cell runs, and that text is copied the same way.
    """
    if issubclass(type(answer), str):
        return exact_str(answer)
    if answer is not None:
        try:
            return to_plain_data(answer)
        except PlainDataError:
            pass
    return exact_str(str(answer))


def release_namespace(ns: dict[str, Any]) -> None:
    """Drop everything a namespace holds: its variables and the host values it was given
    (the context among them), and what its cells left in the stdlib's caches
    (``shared_state.clear_shared_state``). A namespace sits in reference cycles (its
    functions point back at it), so without this they would live until the cyclic
    collector ran."""
    state = ns.get(_STATE)
    if isinstance(state, _CellState):
        state.reserved = {}
        state.sources = {}
        state.final = None
    ns.clear()
    clear_shared_state()


def _restore_reserved(ns: dict[str, Any]) -> list[str]:
    state: _CellState = ns[_STATE]
    restored = []
    for name, obj in state.reserved.items():
        if ns.get(name, MISSING) is not obj:
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
        ns[STOP_FLAG] = False
    stop = CellStop(ns, gen)
    try:
        if on_start is not None:
            on_start(stop)
        ns.pop(ECHO_SLOT, None)
        result = eval(cell.code, ns)  # noqa: S307 - compiled by compile_cell under the policy
        if cell.is_async:
            if ns[STOP_FLAG]:
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
        value = ns.pop(ECHO_SLOT, None)
        if state.stop_reason is not None:
            raise CellTimeout(state.stop_reason)
        if value is not None:
            state.write_stdout(_echo_text(value) + "\n")
        return value
    finally:
        state.tasks.cancel_all(loop)
        with state.lock:
            if state.gen == gen:
                ns[STOP_FLAG] = True
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


def take_final(ns: dict[str, Any]) -> Any:
    """Return the answer given to FINAL/FINAL_VAR in the last cell, or None.

    The answer is plain data (see ``final_value``): an exact str, or JSON-compatible
    data in exact builtin types.
    """
    state: _CellState = ns[_STATE]
    if not state.has_final:
        return None
    answer, state.final, state.has_final = state.final, None, False
    return answer


def stop_requested(ns: dict[str, Any]) -> bool:
    """True while no cell runs or after the running cell was told to stop."""
    return bool(ns[STOP_FLAG])



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
    # "LLMQueryError: ..." and "MyError: ...", not rlm.sandbox.subqueries / __rlm_cell__ paths.
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
