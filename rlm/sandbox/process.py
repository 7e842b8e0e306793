"""The worker-process executor: the same policy as the in-process sandbox, behind OS limits.

Each ``ProcessExecutor`` owns one worker process forked from a per-host template
("zygote") process that already has the policy and every allowed module imported, so a
worker starts in milliseconds. The worker runs cells under the sandbox policy
(``rlm.sandbox.cells``) exactly like the local executor (same compile step, namespace, deadline checks, output cap and
messages); what the process adds is what no in-process policy can give:

- a wall-clock limit enforced from outside: the policy's deadline stops a Python loop
  first (the REPL keeps its variables); if the cell is still running ``KILL_GRACE_S``
  later (one long C call), this process SIGKILLs the worker's init, which nothing
  inside (threads, signal handlers, blocking calls, double forks) can resist. The
  worker's ``result`` does not disarm the kill: the host does, once it sees the
  worker's process tree quiet (``cell_watch``), and it kills a worker that uses CPU
  while no cell runs;
- its own PID namespace where the kernel allows it: the worker runs under a tiny init
  whose death makes the kernel kill every process in the namespace, so nothing the
  worker starts outlives it (else every process of the worker's own uid is swept);
- ``RLIMIT_AS`` (``memory_limit_mb``: a MemoryError the cell can report, or death),
  ``RLIMIT_CPU`` per cell (``cpu_limit_s``), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
  ``RLIMIT_NPROC`` and no core dumps;
- no network: each worker has a network namespace of its own (a loopback left down;
  where the kernel refuses, the zygote's, shared by its workers), and an IPC namespace
  of its own (System V shared memory and queues die with it);
- no secrets: the zygote starts with an empty environment, so the API key never exists
  in any worker;
- a private root: a fresh tmpfs of ``disk_limit_mb`` (all files together) in the
  worker's own mount namespace, which is also its filesystem root (chroot), so it can
  read no host file and write nowhere else; it vanishes with the worker. Without mount
  namespaces it is a fresh directory per worker start instead, chowned by descriptor.

``protections`` (and ``REPLEnv.protections``) reports which of these this machine grants.

Decisions:

- Identity. With a root host, each worker switches to its own uid, leased from a
  machine-wide pool (``isolation.UidPool``) and never reused while a process may still
  hold it: root-owned files are out of reach, no two workers can signal each other, and
  ``RLIMIT_NPROC`` (which the kernel ignores for root) bounds each worker's processes.
  A non-root host instead puts the zygote in an unprivileged user namespace (plus mount
  and network namespaces): inside it a worker is uid 0 with capabilities only over its
  own namespaces, chroots, then drops them all;
  ``RLIMIT_NPROC`` then counts against the host user. Workers also set no_new_privs and
  die with the zygote (which dies with the host).
- Data only crosses the boundary as JSON frames (see ``wire``); nothing the worker
  sends is unpickled or imported here, and every request is checked again with the
  policy's own checks. What a worker says about itself once a cell ran in it is a
  claim: reuse (``worker_pool``), ``protections`` and the end of a cell are decided
  from what the host saw. Cells open files by name only (``jail_files``), and the
  channel sits above every descriptor they can get. The context is sent once per worker start: a str as raw UTF-8
  bytes (ASCII in slices, so the host never holds a second full copy), bytes as is,
  anything else as JSON (tuples arrive as lists, dict keys as str).
- Tools cannot cross a process boundary: a tool runs here, in the host, and the worker
  gets a stub of the same name whose arguments and result must be JSON-like, so no host
  object ever reaches the worker. ``get`` returns a JSON copy of a variable.
- ``llm_query`` and friends in the worker are stubs that send requests back here; this
  process runs them on the env's ``SubQueries`` on the engine loop (one client and one
  limiter for every env), many at once, replying by request id; a cell stopped at its
  deadline tells the host to drop its requests.
- A dead worker (timeout kill, a limit, a crash, a malformed message) is reported in
  the cell's error in words the model can act on, and a fresh worker (fresh root, fresh
  uid) with the context, tools and setup code is started in the background for the
  next cell. Files written by cells do not survive a restart.

Known gaps: no seccomp filter (the kernel's syscall surface stays reachable to code
that escaped the policy; namespaces, uid, rlimits and the jail are the second layer);
where the kernel refuses per-worker network or IPC namespaces, workers share the
zygote's (``protections`` and its notes say so); a non-root host gets no per-worker PID namespace (the kernel refuses
to switch back to the host's one) and so no uid of its own; in the jail the local time
zone is UTC; macOS gets the rlimits it enforces and a jail only as root, no
namespaces; Windows has no process sandbox (ConfigError: use sandbox="local").
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import inspect
import os
import signal
import socket
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rlm import loop as engine
from rlm.errors import ConfigError, EnvClosedError, SandboxError
from rlm.sandbox import CellOutcome, SubQueries
from rlm.sandbox.cell_watch import CellWatch
from rlm.sandbox.context_codec import encode_context
from rlm.sandbox.flow import SubQueryGate
from rlm.sandbox.host_threads import host_pool
from rlm.sandbox.plaindata import PlainDataError, to_plain_data
from rlm.sandbox.protections import PROTECTION_KEYS, local_report, summarise
from rlm.sandbox.tools import wrap_tools
from rlm.sandbox.wire import EXIT_OUT_OF_MEMORY, pack
from rlm.sandbox.worker_link import WorkerLink, WorkerLost
from rlm.sandbox.worker_pool import WarmWorker, WorkerPool, schedule_recycle
from rlm.sandbox.worker_requests import RequestServer
from rlm.sandbox.worker_resources import WorkerResources
from rlm.sandbox.zygote_client import get_zygote, shutdown_zygote

# Address space (MB) a worker needs beyond its size at start to load a REPL and run cells.
START_HEADROOM_MB = 32

__all__ = [
    "PROTECTION_KEYS",
    "ProcessExecutor",
    "describe_protections",
    "process_sandbox_available",
]

# Seconds past a cell's own timeout before the worker is killed: the policy's in-worker
# deadline normally stops a Python loop first (keeping the REPL's variables); the kill is
# for what it cannot stop (one long C call, a wedged interpreter).
KILL_GRACE_S = 1.0
_DEATH_STATUS_WAIT_S = 0.2


def describe_protections(executor: object) -> dict[str, bool | str]:
    """The protections report of any executor: a ProcessExecutor's own, otherwise all off.

    The in-process executor has none of the OS protections (only the policy and its
    soft time limit), so every key is False and ``notes`` says why.
    """
    if isinstance(executor, ProcessExecutor):
        return executor.protections
    return local_report()


def process_sandbox_available() -> bool:
    """True on platforms where worker processes can be forked (Linux, macOS)."""
    return os.name == "posix" and hasattr(os, "fork") and hasattr(socket, "send_fds")


# Every executor not yet closed. At exit they are closed before the engine loop stops
# (this hook is registered after rlm.loop's, so it runs first), whatever order the
# REPLEnv finalizers would run in: their transports close on a live loop.
_live: weakref.WeakSet[ProcessExecutor] = weakref.WeakSet()


def _at_exit() -> None:
    for executor in list(_live):
        with contextlib.suppress(Exception):
            executor.close()
    shutdown_zygote()


atexit.register(_at_exit)


@dataclass
class RawResult:
    """Outcome of the test-only raw hook: the JSON value of ``result``, or an error."""

    value: Any = None
    error: str | None = None
    repr: str | None = None


class ProcessExecutor:
    """Runs one REPLEnv's cells in a confined worker process; see the module docstring.

    ``memory_limit_mb`` caps the worker's address space (the context lives there too:
    leave room for about twice its size), ``cpu_limit_s`` caps the CPU time of each cell
    (None: only the wall timeout), ``file_limit_mb`` the size of any file it writes in
    its working directory, ``disk_limit_mb`` all its files together. A cell that kills
    its worker (timeout, a limit, a crash) gets an error saying so; the next cell starts
    a fresh worker with the context, tools and setup code loaded again.

    ``worker_pool`` (an ``rlm.sandbox.worker_pool.WorkerPool``): borrow a reset worker
    with the same limits from it instead of starting one, and on ``close()`` give the
    worker back (it resets first: see that module for what is and is not carried).
    """

    def __init__(
        self,
        *,
        context: Any = None,
        sub_queries: SubQueries | None = None,
        setup_code: str | None = None,
        tools: Mapping[str, Any] | None = None,
        max_output_chars: int = 20_000,
        memory_limit_mb: int | None = 2048,
        cpu_limit_s: float | None = None,
        file_limit_mb: int = 64,
        disk_limit_mb: int = 256,
        max_open_files: int = 64,
        max_processes: int = 8,
        start_timeout: float = 60.0,
        worker_pool: WorkerPool | None = None,
        _allow_raw: bool = False,
    ) -> None:
        if not process_sandbox_available():
            raise ConfigError(
                f"the process sandbox needs fork and Unix sockets, which {sys.platform} "
                "lacks; use sandbox='local'"
            )
        if memory_limit_mb is not None and memory_limit_mb < 64:
            raise ConfigError("memory_limit_mb must be at least 64 (the interpreter needs it)")
        if cpu_limit_s is not None and cpu_limit_s <= 0:
            raise ConfigError("cpu_limit_s must be a positive number of seconds, or None")
        self._context = context
        # Every sub-query of this env passes the env's caps (REPLEnv hands us its gate).
        self._sub_queries = (
            sub_queries if isinstance(sub_queries, SubQueryGate) else SubQueryGate(sub_queries)
        )
        self._setup_code = setup_code
        # Validated and wrapped exactly as the local executor does; they run here.
        self._tools: dict[str, Callable[..., Any]] = wrap_tools(tools)
        self._server = RequestServer(self._sub_queries, self._tools)
        self.max_output_chars = max_output_chars
        self.memory_limit_mb = memory_limit_mb
        self.cpu_limit_s = cpu_limit_s
        if not isinstance(disk_limit_mb, int) or disk_limit_mb < 1:
            raise ConfigError("disk_limit_mb must be a positive int (MB for all files together)")
        self._file_limit_mb = file_limit_mb
        self._disk_limit_mb = disk_limit_mb
        self._max_open_files = max_open_files
        self._max_processes = max_processes
        self._start_timeout = start_timeout
        self._allow_raw = _allow_raw
        if worker_pool is not None and not isinstance(worker_pool, WorkerPool):
            raise ConfigError("worker_pool must be an rlm.sandbox.worker_pool.WorkerPool or None")
        self._pool = worker_pool
        self._uses = 0  # REPLs the current worker has served, this one included
        self._res = WorkerResources()
        self._finalizer = weakref.finalize(self, WorkerResources.release, self._res)
        _live.add(self)
        self._link: WorkerLink | None = None
        self._watch: CellWatch | None = None
        self._restart: asyncio.Task[WorkerLink] | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self._protections: dict[str, bool | str] = {}
        self._plan: dict[str, Any] = {}
        self.setup_error: str | None = None
        self.restarts = 0
        self._cell_no = 0

    # public API ----------------------------------------------------------------------

    @property
    def protections(self) -> dict[str, bool | str]:
        """Which OS protections the worker actually runs under on this machine.

        Starts the worker if it has not started yet. ``network_namespace`` is ``"own"``
        (one per worker, loopback down), ``"shared"`` (the template's, shared by its
        workers, still without network) or False. Booleans: ``wall_timeout_kill``,
        ``ipc_namespace`` (System V IPC of its own), ``filesystem_jail``, ``uid_drop`` (a
        leased uid of its own), ``pid_namespace``, ``disk_limit`` (a private tmpfs of
        ``disk_limit_mb``), ``capabilities_dropped``, ``empty_environment``,
        ``private_cwd``, ``rlimit_as``, ``rlimit_cpu``, ``rlimit_fsize``,
        ``rlimit_nofile``, ``rlimit_nproc``, ``rlimit_core``. Also ``kill_scope`` (what a
        kill reaches: ``"pid_namespace"``, ``"uid"`` or ``"process_group"``),
        ``file_access``, ``data_modules`` and ``notes`` (why something is missing). It
        is what the worker reported when it was fresh, before any user code ran in it.
        """
        if not self._protections:
            self.start()
        return dict(self._protections)

    def start(self) -> None:
        """Start the worker now (otherwise the first cell does): context and setup code load."""
        self._check_open()
        engine.run_sync(self._on_engine(self._start_locked()))

    def execute(self, code: str, timeout: float | None) -> CellOutcome:
        """Run one cell, blocking the calling thread; never raises for the cell's faults."""
        _check_code(code)
        self._check_open()
        return engine.run_sync(self._on_engine(self._execute(code, timeout)))

    async def aexecute(self, code: str, timeout: float | None) -> CellOutcome:
        """Run one cell from any event loop; the channel I/O itself runs on the engine loop."""
        _check_code(code)
        self._check_open()
        return await self._on_engine(self._execute(code, timeout))

    def get(self, name: str) -> Any:
        """Return a copy of variable ``name`` from the worker (it crosses as JSON).

        Raises ``KeyError`` if the name is not defined and ``SandboxError`` if its value is
        not JSON-like (convert it to a str or list inside a cell first).
        """
        self._check_open()
        msg = engine.run_sync(self._on_engine(self._command({"op": "get", "name": name})))
        if msg.get("op") == "lost":
            raise SandboxError(f"could not read {name!r}: {msg['error']}")
        if not msg.get("ok"):
            raise KeyError(name)
        if "repr" in msg:
            raise SandboxError(
                f"variable {name!r} holds a value that cannot leave the process sandbox "
                f"(only JSON-like data can): {msg['repr'][:200]}"
            )
        return msg.get("value")

    def interrupt(self, reason: str) -> None:
        """Stop the running cell (if any) now: its worker is killed and the cell returns what
        it printed so far, with ``reason`` in its error. Safe from any thread; the next
        cell starts a fresh worker.
        """
        link = self._link
        if link is None:
            return

        def lose() -> None:
            fut = link.reply
            if fut is not None and not fut.done():
                fut.set_exception(WorkerLost(None, reason))

        with contextlib.suppress(RuntimeError):  # the engine loop is already gone
            engine.engine_loop().call_soon_threadsafe(lose)

    def close(self) -> None:
        """Kill the worker and remove its working directory; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # Released now, not when a collection finds this executor's cycles.
        self._context = None
        link, self._link = self._link, None
        if self._watch is not None:
            self._watch.stop()
        if self._pool is not None and link is not None:
            if self._reusable(link):
                handed = self._res.disown(link.pid)
                if handed is not None:
                    link.bind(None)
                    schedule_recycle(self._pool, self._pool_key(), WarmWorker(link, *handed),
                                     self._uses)
            elif link.tainted and not link.dead:
                self._pool.note_refused()
        self._finalizer()
        restart, self._restart = self._restart, None
        if restart is not None:
            with contextlib.suppress(RuntimeError):
                restart.get_loop().call_soon_threadsafe(restart.cancel)

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # test hook -----------------------------------------------------------------------

    def _run_raw(self, code: str, timeout: float = 10.0) -> RawResult:
        """Run unrestricted Python in the worker (tests only: needs ``_allow_raw=True``).

        It bypasses the policy to show that each OS protection holds on its own; the
        value of the variable ``result`` comes back as JSON.
        """
        if not self._allow_raw:
            raise ConfigError("the raw hook exists only for the sandbox's own tests")
        self._check_open()
        msg = engine.run_sync(
            self._on_engine(self._command({"op": "raw", "code": code}, limit=timeout))
        )
        if msg.get("op") == "lost":
            return RawResult(error=msg["error"])
        if not msg.get("ok"):
            return RawResult(error=msg.get("error"))
        return RawResult(value=msg.get("value"), repr=msg.get("repr"))

    # engine-loop internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EnvClosedError("this REPL environment is closed; create a new one")

    @staticmethod
    async def _on_engine(coro: Any) -> Any:
        loop = engine.engine_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return await coro
        finished: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def run() -> Any:
            try:
                return await coro
            finally:
                finished.set_result(None)

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Cancelling only asks the engine side to stop; wait until it has (the worker
            # killed), so a cancelled cell is really over when the caller moves on.
            future.cancel()
            await asyncio.wait([asyncio.wrap_future(finished)], timeout=10.0)
            raise

    def _the_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _start_locked(self) -> None:
        async with self._the_lock():
            await self._ensure_worker()

    def _schedule_restart(self) -> None:
        """Start the next worker now, in the background, so the next cell need not wait."""
        self.restarts += 1
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._spawn())
        # A failed restart is retried, and reported, by the next cell.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._restart = task

    async def _ensure_worker(self) -> WorkerLink:
        restart, self._restart = self._restart, None
        if restart is not None:
            with contextlib.suppress(Exception):
                await restart
        link = self._link
        if link is not None and not link.dead:
            return link
        if link is not None:
            await self._bury(link)
        return await self._spawn()

    def _spec(self) -> dict[str, Any]:
        """The limits a worker fixes for its whole life (and so what a pooled one must match)."""
        return {
            "disk_bytes": self._disk_limit_mb << 20,
            "as_bytes": None if self.memory_limit_mb is None else self.memory_limit_mb << 20,
            "fsize_bytes": self._file_limit_mb << 20,
            "nofile": self._max_open_files,
            "nproc": self._max_processes,
        }

    def _pool_key(self) -> Any:
        return tuple(sorted(self._spec().items()))

    def _reusable(self, link: WorkerLink) -> bool:
        """Whether ``link``'s worker may be offered to another REPL, judged only from what
        the host saw: never asked to hand out a data library, never timed out or dead,
        and idle (no command or request in flight)."""
        busy = self._lock is not None and self._lock.locked()
        return not (busy or link.tainted or link.dead or link.timed_out or link.killed_by_host
                    or link.reply is not None or link.tasks or link.pulls)

    async def _spawn(self) -> WorkerLink:
        if self._closed:
            raise EnvClosedError("this REPL environment is closed; create a new one")
        if self._pool is not None:
            while True:
                taken = self._pool.take(self._pool_key())
                if taken is None:
                    self._pool.note_started()
                    break
                warm, uses = taken
                assert isinstance(warm, WarmWorker)
                try:
                    return await self._load_warm(warm, uses)
                except SandboxError:
                    continue  # it died while idle or failed to load (and is buried): next
        self._uses = 1
        return await self._start_fresh()

    async def _load_warm(self, warm: WarmWorker, uses: int) -> WorkerLink:
        """Adopt a pooled worker and load this REPL into it."""
        try:
            self._res.check_open()
        except EnvClosedError:
            warm.discard()
            raise
        try:
            self._res.adopt(warm.pid, warm.uid, warm.zygote)  # closed meanwhile: killed, reaped
        finally:
            warm.hand_over()
        self._res.attach(warm.transport)
        self._plan = warm.zygote.plan
        link = warm.link
        link.bind(self._server, self.max_output_chars)
        self._link = link
        self._uses = uses + 1
        return await self._load(link)

    async def _start_fresh(self) -> WorkerLink:
        loop = asyncio.get_running_loop()
        zygote = await loop.run_in_executor(host_pool(), get_zygote)
        self._plan = zygote.plan
        self._res.check_open()
        spec = self._spec()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid, uid = await loop.run_in_executor(host_pool(), zygote.spawn, spec, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._res.adopt(pid, uid, zygote)
        reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
        self._res.attach(writer.transport)
        link = self._link = WorkerLink(self._server, self.max_output_chars, pid, reader, writer)
        # A fresh worker (no code of the REPL's has run in it yet) already holds the
        # interpreter and the preloaded data libraries: an address-space cap below that
        # plus room to work cannot start it, and it would stall rather than fail.
        size_mb = _address_space_mb(link.pid)
        if (self.memory_limit_mb is not None and size_mb is not None
                and self.memory_limit_mb < size_mb + START_HEADROOM_MB):
            await self._bury(link)
            raise SandboxError(
                f"the sandbox worker did not start: memory_limit_mb={self.memory_limit_mb} is "
                f"below what the worker itself takes ({size_mb} MB of address space: the "
                f"interpreter and its preloaded libraries); raise memory_limit_mb to at "
                f"least {size_mb + START_HEADROOM_MB} plus room for the context"
            )
        return await self._load(link)

    async def _load(self, link: WorkerLink) -> WorkerLink:
        """Send the REPL (context, tools, setup code, caps) to ``link``'s worker; wait ready."""
        self._watch = CellWatch(link.pid, functools.partial(_host_kill, self._res, link))
        writer = link.writer
        kind, total, chunks = encode_context(self._context)
        init = {
            "op": "init",
            "context_kind": kind,
            "setup_code": self._setup_code,
            "tools": [
                {"name": name, "async": inspect.iscoroutinefunction(fn), "doc": fn.__doc__}
                for name, fn in self._tools.items()
            ],
            "max_output_chars": self.max_output_chars,
            "memory_limit_mb": self.memory_limit_mb,
            "limits": self._sub_queries.limits.as_dict(),
            "allow_raw": self._allow_raw,
        }
        try:
            writer.write(pack(init, total))
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
            ready = await link.answer("ready", self._start_timeout)
        except (TimeoutError, WorkerLost, ConnectionError) as exc:
            status = await self._bury(link)
            if isinstance(exc, TimeoutError):
                why = f"its setup code ran longer than start_timeout={self._start_timeout:g} s"
            elif (
                status is not None
                and os.WIFEXITED(status)
                and (os.WEXITSTATUS(status) == EXIT_OUT_OF_MEMORY)
            ):
                why = (
                    f"it ran out of memory loading the context and setup code; raise "
                    f"memory_limit_mb (now {self.memory_limit_mb}) to well over twice the "
                    "context's size"
                )
            else:
                why = _describe_status(status)
            raise SandboxError(f"the sandbox worker did not start: {why}") from exc
        self.setup_error = ready.get("setup_error")
        # Only what the worker reported before any user code ran in it: on a reused
        # worker, what it says now would be a claim.
        self._protections = summarise(link.hello or {}, self._plan, self.cpu_limit_s)
        return link


    async def _bury(self, link: WorkerLink) -> int | None:
        """Make sure ``link``'s worker is dead and reaped; return its wait status."""
        if self._link is link:
            self._link = None
        if self._watch is not None and self._watch.pid == link.pid:
            self._watch.stop()
        # A channel that simply closed means the worker died on its own: wait a moment
        # for its real wait status (the words the cell gets) before killing the rest.
        died = (link.lost is not None and not link.lost.reason and not link.timed_out
                and not link.killed_by_host)
        link.dead = True
        for task in link.tasks.values():
            task.cancel()
        loop = asyncio.get_running_loop()
        status = await loop.run_in_executor(
            host_pool(), self._res.kill, link.pid, _DEATH_STATUS_WAIT_S if died else 0.0
        )
        link.writer.transport.close()
        link.read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await link.read_task
        return status

    async def _command(self, msg: dict[str, Any], limit: float | None = 60.0) -> dict[str, Any]:
        async with self._the_lock():
            link = await self._ensure_worker()
            watch = self._watch
            if watch is not None:
                watch.pause()  # what the command makes the worker do is not idleness
            try:
                answer = await link.command(msg, limit)
                if watch is not None:
                    watch.resume()
                return answer
            except (TimeoutError, WorkerLost) as exc:
                status = await self._bury(link)
                self._schedule_restart()
                what = (
                    "it took too long"
                    if isinstance(exc, TimeoutError)
                    else (_describe_status(status))
                )
                return {"op": "lost", "ok": False, "error": f"the worker was lost: {what}"}
            except asyncio.CancelledError:
                await asyncio.shield(self._bury(link))
                raise

    async def _execute(self, code: str, timeout: float | None) -> CellOutcome:
        async with self._the_lock():
            stale = self._link
            if stale is not None and stale.killed_by_host:
                await self._bury(stale)
                self._schedule_restart()
                return self._died(
                    stale,
                    f"this cell did not run: the worker process was killed because "
                    f"{stale.killed_by_host}",
                    cell_output=False,
                )
            try:
                link = await self._ensure_worker()
            except SandboxError as exc:
                return CellOutcome(error=str(exc))
            link.partial = {"stdout": [], "stderr": []}
            link.partial_len = 0
            # Numbered here, not in the worker, so tracebacks keep counting across restarts.
            self._cell_no += 1
            msg = {
                "op": "exec",
                "code": code,
                "filename": f"<cell {self._cell_no}>",
                "timeout": timeout,
                "cpu": self.cpu_limit_s,
            }
            limit = None if timeout is None else timeout + KILL_GRACE_S
            # The kill is armed on the deadline thread, not only on this loop: a loop
            # busy with other envs' traffic must not make the kill late. The worker's
            # result does not disarm it; the host does, once it sees the worker quiet.
            watch = self._watch
            assert watch is not None and watch.pid == link.pid
            watch.arm(limit)
            try:
                reply = await link.command(msg, None if limit is None else limit + 1.0)
                watch.result_arrived()
            except (TimeoutError, WorkerLost) as exc:
                if isinstance(exc, WorkerLost) and link.killed_by_host:
                    await self._bury(link)
                    self._schedule_restart()
                    return self._died(
                        link, f"the cell's worker process was killed because {link.killed_by_host}"
                    )
                if isinstance(exc, WorkerLost) and not link.timed_out:
                    status = await self._bury(link)
                    self._schedule_restart()
                    return self._died(link, self._death_words(status, exc.reason))
                await self._bury(link)
                self._schedule_restart()
                return self._died(
                    link,
                    f"TimeoutError: the cell ran past its {timeout:g} s time limit and did not "
                    "stop (a single long C-level operation such as a huge power, a giant "
                    "string or a catastrophic regular expression), so its worker process "
                    "was killed",
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._bury(link))
                raise
            return self._outcome(reply)

    def _died(self, link: WorkerLink, what: str, cell_output: bool = True) -> CellOutcome:
        return CellOutcome(
            stdout="".join(link.partial["stdout"]) if cell_output else "",
            stderr="".join(link.partial["stderr"]) if cell_output else "",
            error=(
                f"{what}; the REPL was restarted: all variables from earlier cells are lost "
                "(context, tools and setup code are loaded again)"
            ),
        )

    def _death_words(self, status: int | None, reason: str) -> str:
        if reason and reason != "closed":
            return f"the cell's worker process was stopped because {reason}"
        if status is None:
            return "the cell's worker process died"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU:
                limit = f"{self.cpu_limit_s:g} s " if self.cpu_limit_s is not None else ""
                return f"the cell used more than its {limit}CPU-time limit and was killed"
            name = _signal_name(sig)
            if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGKILL):
                return (
                    f"the cell's worker process crashed ({name}), most likely by exceeding "
                    f"the {self.memory_limit_mb} MB memory limit"
                )
            return f"the cell's worker process was killed by {name}"
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            if code == EXIT_OUT_OF_MEMORY:
                return (
                    f"the cell's worker process ran out of memory (the {self.memory_limit_mb} MB "
                    "limit, memory_limit_mb) outside the cell's own code"
                )
            return f"the cell's worker process exited (status {code})"
        return "the cell's worker process died"

    def _outcome(self, reply: dict[str, Any]) -> CellOutcome:
        # The worker already capped its output; capping again here means a broken worker
        # cannot hand the host more than the limit either.
        cap = self.max_output_chars + 200
        stdout = _text(reply.get("stdout"))[:cap]
        stderr = _text(reply.get("stderr"))[:cap]
        error = None if reply.get("error") is None else _text(reply.get("error"))[:cap]
        final = reply.get("final")
        if final is not None:
            try:
                # Decoded JSON is plain already; the copy enforces the same depth and size
                # caps as the worker's, which a subverted worker could skip.
                final = to_plain_data(final)
            except PlainDataError as exc:
                final = None
                error = f"the FINAL value could not be handed to the host: {exc}"
        return CellOutcome(
            stdout=stdout,
            stderr=stderr,
            error=error,
            final=final,
            truncated=bool(reply.get("truncated")),
        )


# -- helpers ---------------------------------------------------------------------------


def _host_kill(res: WorkerResources, link: WorkerLink, reason: str) -> None:
    """On the deadline thread: SIGKILL ``link``'s worker, whatever the loop is doing.

    ``reason`` is empty for a cell past its deadline, else why a worker that said its
    cell was over was killed (the next cell says so).
    """

    def mark() -> None:
        if reason:
            link.killed_by_host = reason
        else:
            link.timed_out = True

    res.kill_now(link.pid, mark)


def _check_code(code: Any) -> None:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, not {type(code).__name__}")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _describe_status(status: int | None) -> str:
    if status is None:
        return "no exit status"
    if os.WIFSIGNALED(status):
        return f"killed by {_signal_name(os.WTERMSIG(status))}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


def _address_space_mb(pid: int) -> int | None:
    """The virtual memory size of process ``pid`` in MB, from /proc (None where unknown)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        return None
    return None
