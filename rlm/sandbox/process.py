"""The worker-process executor: the same policy as the in-process sandbox, behind OS limits.

Each ``ProcessExecutor`` owns one worker process forked from a per-host template
("zygote") process that already has the policy and every allowed module imported, so a
worker starts in milliseconds. The worker runs cells under the sandbox policy
(``rlm.sandbox.cells``) exactly like the local executor (same compile step, namespace, deadline checks, output cap and
messages); what the process adds is what no in-process policy can give:

- a wall-clock limit enforced from outside: the policy's deadline stops a Python loop
  first (the REPL keeps its variables); if the cell is still running ``KILL_GRACE_S``
  later (one long C call), this process SIGKILLs the worker's init, which nothing
  inside (threads, signal handlers, blocking calls, double forks) can resist;
- its own PID namespace where the kernel allows it: the worker runs under a tiny init
  whose death makes the kernel kill every process in the namespace, so nothing the
  worker starts outlives it (else every process of the worker's own uid is swept);
- ``RLIMIT_AS`` (``memory_limit_mb``: a MemoryError the cell can report, or death),
  ``RLIMIT_CPU`` per cell (``cpu_limit_s``), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
  ``RLIMIT_NPROC`` and no core dumps;
- no network: the zygote lives in its own network namespace (a loopback left down);
- no secrets: the zygote starts with an empty environment, so the API key never exists
  in any worker;
- a private root: a fresh tmpfs of ``disk_limit_mb`` (all files together) in the
  worker's own mount namespace, which is also its filesystem root (chroot), so it can
  read no host file and write nowhere else; it vanishes with the worker. Without mount
  namespaces it is a fresh directory per worker start instead, chowned by descriptor.

``protections`` (and ``REPLEnv.protections``) reports which of these this machine grants.

Decisions:

- Identity. With a root host, each worker switches to its own uid, leased from a
  machine-wide pool (``_isolation.UidPool``) and never reused while a process may still
  hold it: root-owned files are out of reach, no two workers can signal each other, and
  ``RLIMIT_NPROC`` (which the kernel ignores for root) bounds each worker's processes.
  A non-root host instead puts the zygote in an unprivileged user namespace (plus mount
  and network namespaces): inside it a worker is uid 0 with capabilities only over its
  own namespaces, chroots, then drops them all;
  ``RLIMIT_NPROC`` then counts against the host user. Workers also set no_new_privs and
  die with the zygote (which dies with the host).
- Data only crosses the boundary as JSON frames (see ``_worker``); nothing the worker
  sends is unpickled or imported here, and every request is checked again with the
  policy's own checks. The context is sent once per worker start: a str as raw UTF-8
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
workers of one host share a network namespace (abstract Unix sockets could connect two
escaped workers); a non-root host gets no per-worker PID namespace (the kernel refuses
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
import heapq
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm import loop as engine
from rlm.errors import ConfigError, EnvClosedError, SandboxError
from rlm.sandbox import CellOutcome, SubQueries
from rlm.sandbox._worker import (
    EXIT_OUT_OF_MEMORY,
    HEADER,
    control_recv,
    control_send,
    pack,
)
from rlm.sandbox.flow import SubQueryGate, max_frame_bytes
from rlm.sandbox.local import _short, _wrap_tools
from rlm.sandbox.plaindata import PlainDataError, to_plain_data
from rlm.sandbox.subqueries import LLMQueryError, check_subquery_params, check_subquery_prompt
from rlm.sandbox.worker_pool import WorkerPool

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
_ZYGOTE_START_TIMEOUT_S = 60.0
_CONTROL_TIMEOUT_S = 30.0
_CONTEXT_CHUNK = 8 * 1024 * 1024
_DEATH_STATUS_WAIT_S = 0.2
_WRITE_BUFFER_HIGH = 8 << 20


PROTECTION_KEYS = (
    "wall_timeout_kill",
    "network_namespace",
    "filesystem_jail",
    "uid_drop",
    "pid_namespace",
    "disk_limit",
    "capabilities_dropped",
    "empty_environment",
    "private_cwd",
    "rlimit_as",
    "rlimit_cpu",
    "rlimit_fsize",
    "rlimit_nofile",
    "rlimit_nproc",
    "rlimit_core",
)


def describe_protections(executor: object) -> dict[str, bool | str]:
    """The protections report of any executor: a ProcessExecutor's own, otherwise all off.

    The in-process executor has none of the OS protections (only the policy and its
    soft time limit), so every key is False and ``notes`` says why.
    """
    if isinstance(executor, ProcessExecutor):
        return executor.protections
    report: dict[str, bool | str] = dict.fromkeys(PROTECTION_KEYS, False)
    report["kill_scope"] = "none"
    report["file_access"] = False
    report["data_modules"] = ""
    report["notes"] = (
        "sandbox='local' runs cells in this process: only the policy and its soft time "
        "limit apply; use sandbox='process' for OS-enforced limits"
    )
    return report


# Spawning, reaping and tool calls run on pools of their own, never on the running
# loop's default executor: callers park threads of that executor while they wait for an
# env to start (RLM runs create envs with asyncio.to_thread), and if those threads were
# also the only ones that could do the start, a few concurrent runs would deadlock.
_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"rlm-sandbox-{name}"
            )
        return pool


def _host_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Short blocking steps of the host: asking the zygote to fork, killing and reaping."""
    return _pool("host", 16)


def _tool_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Sync tool functions called from cells (they may block for as long as they like)."""
    return _pool("tools", 32)


def process_sandbox_available() -> bool:
    """True on platforms where worker processes can be forked (Linux, macOS)."""
    return os.name == "posix" and hasattr(os, "fork") and hasattr(socket, "send_fds")


# -- the zygote ------------------------------------------------------------------------

# The zygote registers a bare ``rlm`` package instead of running ``rlm/__init__.py``: that
# would import the HTTP client stack (openai, ~1 s and tens of MB) into every worker,
# which needs only ``rlm.sandbox``.
_BOOT = (
    "import sys, json, types\n"
    "sys.path[:0] = json.loads(sys.argv[2])\n"
    "pkg = types.ModuleType('rlm')\n"
    "pkg.__path__ = [sys.argv[3]]\n"
    "sys.modules['rlm'] = pkg\n"
    "from rlm.sandbox._worker import zygote_main\n"
    "zygote_main(int(sys.argv[1]))\n"
)


class _Zygote:
    """Host-side handle of the template process; thread-safe, blocking request/reply."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner_pid = os.getpid()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_dir = Path(__file__).resolve().parents[1]
        package_root = str(package_dir.parent)
        # The host's own import path (minus its cwd), so the zygote loads the same rlm and
        # RestrictedPython; -I keeps PYTHON* variables and the user site out.
        path = [package_root] + [p for p in sys.path if p and os.path.isabs(p)]
        with tempfile.TemporaryFile() as errors:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    _BOOT,
                    str(child.fileno()),
                    json.dumps(path),
                    str(package_dir),
                ],
                pass_fds=[child.fileno()],
                env={},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
            child.close()
            self.sock = parent
            try:
                parent.settimeout(_ZYGOTE_START_TIMEOUT_S)
                ready, _ = control_recv(parent)
            except (OSError, ValueError):
                ready = None
            if ready is None:
                self._stop()
                errors.seek(0)
                detail = errors.read().decode(errors="replace")[-3000:]
                raise SandboxError(
                    "the process sandbox's template process failed to start; use "
                    f"sandbox='local' or fix the error below:\n{detail}"
                )
        parent.settimeout(_CONTROL_TIMEOUT_S)
        self.plan: dict[str, Any] = ready["plan"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.sock.fileno() != -1

    def _request(self, msg: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        with self.lock:
            try:
                control_send(self.sock, msg, fds)
                answer, _ = control_recv(self.sock)
            except (OSError, ValueError) as exc:
                # A timed-out or broken exchange leaves the channel out of step: retire
                # this zygote (it then kills its workers); the next request starts anew.
                self.sock.close()
                raise SandboxError(f"the sandbox template process is gone ({exc})") from exc
        if answer is None:
            raise SandboxError("the sandbox template process is gone")
        if not answer.get("ok"):
            raise SandboxError(f"the sandbox template process refused: {answer.get('error')}")
        return answer

    def spawn(self, spec: dict[str, Any], channel: socket.socket) -> tuple[int, int | None]:
        """Fork a worker that confines itself per ``spec`` and serves ``channel``.

        Returns the pid of the worker's init (what the host kills) and its leased uid.
        """
        answer = self._request({"op": "spawn", "spec": spec}, [channel.fileno()])
        uid = answer.get("uid")
        return int(answer["pid"]), None if uid is None else int(uid)

    def reap(self, pid: int, grace: float = 0.0) -> int | None:
        """Kill (again) and reap worker ``pid``; its wait status, or None if unknown yet."""
        try:
            status = self._request({"op": "reap", "pid": pid, "grace": grace})["status"]
        except SandboxError:
            return None
        return None if status is None else int(status)

    def _stop(self) -> None:
        # Closing the control socket tells the zygote to kill every worker and exit.
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        with self.lock:
            self._stop()


_zygote_lock = threading.Lock()
_zygote: _Zygote | None = None


def _get_zygote() -> _Zygote:
    """The zygote of this host process, started on first use (and again if it died)."""
    global _zygote
    with _zygote_lock:
        z = _zygote
        if z is None or z.owner_pid != os.getpid() or not z.alive:
            if z is not None and z.owner_pid == os.getpid():
                z.close()
            z = _zygote = _Zygote()
        return z


def _shutdown_zygote() -> None:
    global _zygote
    with _zygote_lock:
        z, _zygote = _zygote, None
    if z is not None and z.owner_pid == os.getpid():
        z.close()


# Every executor not yet closed. At exit they are closed before the engine loop stops
# (this hook is registered after rlm.loop's, so it runs first), whatever order the
# REPLEnv finalizers would run in: their transports close on a live loop.
_live: weakref.WeakSet[ProcessExecutor] = weakref.WeakSet()


def _at_exit() -> None:
    for executor in list(_live):
        with contextlib.suppress(Exception):
            executor.close()
    _shutdown_zygote()


atexit.register(_at_exit)


# -- kill deadlines ----------------------------------------------------------------------


class _Deadlines:
    """One daemon thread that fires every env's kill deadline on time.

    The engine loop also times each cell, but a loop saturated by other envs' traffic
    runs its timers late; this thread does nothing else, so a kill lands when due.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int]] = []
        self.armed: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        self.seq = 0
        self.thread: threading.Thread | None = None

    def arm(self, delay: float, action: Callable[..., None], *args: Any) -> int:
        """Call ``action(*args)`` on this thread ``delay`` seconds from now; a token."""
        with self.cond:
            self.seq += 1
            token = self.seq
            self.armed[token] = (action, args)
            heapq.heappush(self.heap, (time.monotonic() + delay, token))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="rlm-deadlines", daemon=True)
                self.thread.start()
            self.cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self.cond:
            self.armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    while self.heap and self.heap[0][1] not in self.armed:
                        heapq.heappop(self.heap)
                    if not self.heap:
                        self.cond.wait()
                        continue
                    wait = self.heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
                _, token = heapq.heappop(self.heap)
                entry = self.armed.pop(token, None)
            if entry is not None:
                action, args = entry
                with contextlib.suppress(Exception):
                    action(*args)


_deadlines = _Deadlines()


# -- one worker, host side --------------------------------------------------------------


class _WorkerLost(Exception):
    """The worker's channel closed (it died or was killed); ``status`` is its wait status."""

    def __init__(self, status: int | None, reason: str = "") -> None:
        super().__init__(reason or "worker lost")
        self.status = status
        self.reason = reason


class _Resources:
    """What must be released however the executor ends (close, GC or interpreter exit).

    Shared by the engine loop (which starts and buries workers) and whichever thread
    closes the executor, so every change happens under one lock, and a worker started
    after the executor closed is killed on arrival instead of leaking.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.pid: int | None = None
        self.uid: int | None = None
        self.zygote: _Zygote | None = None
        self.transport: asyncio.BaseTransport | None = None

    def check_open(self) -> None:
        with self.lock:
            if self.closed:
                raise EnvClosedError("this REPL environment is closed; create a new one")

    def adopt(self, pid: int, uid: int | None, zygote: _Zygote) -> None:
        with self.lock:
            if not self.closed:
                self.pid, self.uid, self.zygote = pid, uid, zygote
                return
        _kill_group(pid)
        zygote.reap(pid)
        raise EnvClosedError("this REPL environment is closed; create a new one")

    def attach(self, transport: asyncio.BaseTransport) -> None:
        with self.lock:
            if not self.closed:
                self.transport = transport
                return
        transport.close()
        raise EnvClosedError("this REPL environment is closed; create a new one")

    def kill_now(self, pid: int) -> None:
        """SIGKILL ``pid`` if it is still this env's worker (not yet reaped); any thread."""
        with self.lock:
            if pid == self.pid:
                _kill_group(pid)

    def kill(self, pid: int | None = None, grace: float = 0.0) -> int | None:
        """SIGKILL worker ``pid`` (default: the current one) and everything it made; reap it.

        ``grace`` > 0 is for a worker that died on its own: its wait status (the reason
        the cell reports) is given that long to arrive before the kill. Returns the wait
        status, or None if unknown (or already reaped before).
        """
        with self.lock:
            if pid is None or pid == self.pid:
                pid, zygote, transport = self.pid, self.zygote, self.transport
                self.pid = self.transport = None
            else:
                return None  # not the current worker: buried already
        status = None
        if pid is not None:
            if grace <= 0:
                _kill_group(pid)
            if zygote is not None:
                status = zygote.reap(pid, grace)
        if transport is not None:
            _close_transport(transport)
        return status

    def disown(self, pid: int) -> tuple[int, int | None, _Zygote, asyncio.BaseTransport] | None:
        """Hand worker ``pid`` over (to a pool) instead of killing it on release."""
        with self.lock:
            if pid != self.pid or self.zygote is None or self.transport is None:
                return None
            handed = (pid, self.uid, self.zygote, self.transport)
            self.pid = self.transport = None
            return handed

    def release(self) -> None:
        with self.lock:
            self.closed = True
        self.kill()


def _kill_group(pid: int) -> None:
    # ``pid`` is the worker's init: with a PID namespace its death takes every process
    # in it; without, the zygote sweeps the worker's uid after reaping. The zygote reaps
    # only on our request, so the pid cannot have been reused meanwhile.
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)


def _close_transport(transport: asyncio.BaseTransport) -> None:
    loop = getattr(transport, "_loop", None)
    if loop is None or loop.is_closed():
        return
    if engine.in_engine_thread() or not loop.is_running():
        transport.close()
        return
    done = threading.Event()

    def close() -> None:
        transport.close()
        done.set()

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(close)
        done.wait(2.0)


class _Link:
    """The engine-loop side of one worker's channel: a reader task and request routing."""

    def __init__(
        self,
        executor: ProcessExecutor,
        pid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # Weak, so a running reader task does not keep an abandoned executor alive (its
        # finalizer then kills the worker).
        self.executor: Callable[[], ProcessExecutor | None] = weakref.ref(executor)
        self.max_output_chars = executor.max_output_chars
        self.max_frame = max_frame_bytes(executor._sub_queries.limits)
        self.pulls: dict[Any, asyncio.Future[list[Any]]] = {}
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.reply: asyncio.Future[dict[str, Any]] | None = None
        self.partial: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.partial_len = 0
        self.tasks: dict[Any, asyncio.Task[None]] = {}
        self.dead = False
        self.timed_out = False
        self.lost: _WorkerLost | None = None
        self.read_task = asyncio.get_running_loop().create_task(self._read_loop())

    def bind(self, executor: ProcessExecutor | None) -> None:
        """Route this worker's requests to ``executor`` (None while it waits in a pool)."""
        if executor is None:
            self.executor = lambda: None
            return
        self.executor = weakref.ref(executor)
        self.max_output_chars = executor.max_output_chars
        self.max_frame = max_frame_bytes(executor._sub_queries.limits)
        self.partial = {"stdout": [], "stderr": []}
        self.partial_len = 0
        self.timed_out = False

    def send(self, msg: dict[str, Any]) -> None:
        if not self.dead:
            self.writer.write(pack(msg))

    async def pull(self, rid: Any, start: int, count: int, budget: int) -> list[Any]:
        """Ask the worker for up to ``count`` prompts of batch ``rid`` from ``start``."""
        if self.dead or rid in self.pulls:
            raise LLMQueryError("llm_query_batch: the worker is gone")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.pulls[rid] = fut
        try:
            self.send({"op": "pull", "id": rid, "start": start, "count": count, "max_bytes": budget})
            return await fut
        finally:
            self.pulls.pop(rid, None)

    async def command(self, msg: dict[str, Any], limit: float | None) -> dict[str, Any]:
        """Send one command and wait for its answer; raises _WorkerLost or TimeoutError."""
        if self.dead:
            raise self.lost or _WorkerLost(None)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.reply = fut
        try:
            self.send(msg)
            return await asyncio.wait_for(fut, limit)
        finally:
            self.reply = None

    async def _read_loop(self) -> None:
        reason = ""
        try:
            while True:
                head = await self.reader.readexactly(HEADER.size)
                json_len, payload_len = HEADER.unpack(head)
                if json_len > self.max_frame or payload_len:
                    # Refused before a byte of it is read: a worker cannot make the host
                    # allocate more than one frame's worth.
                    reason = (
                        f"it sent a message of {json_len:,} bytes, more than the "
                        f"{self.max_frame:,} the sandbox accepts"
                    )
                    break
                body = await self.reader.readexactly(json_len)
                try:
                    msg = json.loads(body)
                    del body
                    ok = isinstance(msg, dict) and self._dispatch(msg)
                except Exception:  # noqa: BLE001 - deep nesting, bad UTF-8, odd types...
                    ok = False
                if not ok:
                    reason = "it sent a malformed message"
                    break
                if self.writer.transport.get_write_buffer_size() > _WRITE_BUFFER_HIGH:
                    # The worker is not reading its replies: stop reading its requests.
                    await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            reason = "closed"
        except Exception:  # noqa: BLE001 - whatever breaks the reader, the worker goes
            reason = "its channel broke"
        self.dead = True
        # EOF leaves a stream transport half-open; close it now, whoever buries us later.
        self.writer.close()
        self.lost = _WorkerLost(None, reason)
        for task in self.tasks.values():
            task.cancel()
        for pull in self.pulls.values():
            if not pull.done():
                pull.set_exception(self.lost)
        fut = self.reply
        if fut is not None and not fut.done():
            fut.set_exception(self.lost)

    def _dispatch(self, msg: dict[str, Any]) -> bool:
        op = msg.get("op")
        if op in ("query", "batch", "tool"):
            rid = msg.get("id")
            if not isinstance(rid, int) or rid in self.tasks:
                return False
            executor = self.executor()
            if executor is None:
                return False
            task = asyncio.get_running_loop().create_task(executor._serve(self, msg))
            self.tasks[rid] = task
            task.add_done_callback(lambda _t: self.tasks.pop(rid, None))
            return True
        if op == "items":
            fut = self.pulls.get(msg.get("id"))
            prompts = msg.get("prompts")
            if fut is None or fut.done() or not isinstance(prompts, list):
                return False
            fut.set_result(prompts)
            return True
        if op == "cancel":
            # The cell stopped waiting (deadline, cancelled await): drop the request.
            task = self.tasks.pop(msg.get("id"), None)
            if task is not None:
                task.cancel()
            return True
        if op == "out":
            text, stream = msg.get("text"), msg.get("stream")
            if not isinstance(text, str) or stream not in self.partial:
                return False
            # Kept only for a cell that dies before it can report; bounded like output.
            room = self.max_output_chars - self.partial_len
            if room > 0:
                self.partial[stream].append(text[:room])
                self.partial_len += min(len(text), room)
            return True
        if op in ("result", "value", "raw_result", "ready", "clean"):
            fut = self.reply
            # A reply nobody waits for any more (its command was cancelled) is dropped.
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return True
        return False


# -- warm workers ----------------------------------------------------------------------

_RESET_TIMEOUT_S = 10.0
# Recycling tasks and ending channel readers (a task nobody references may be
# collected mid-way).
_recycling: set[asyncio.Task[None]] = set()


class _WarmWorker:
    """A reset worker waiting in a ``WorkerPool``: its channel and what kills it."""

    def __init__(
        self, link: _Link, pid: int, uid: int | None, zygote: _Zygote,
        transport: asyncio.BaseTransport,
    ) -> None:
        self.link, self.pid, self.uid, self.zygote, self.transport = link, pid, uid, zygote, transport
        self._lock = threading.Lock()
        self._gone = False

    @property
    def alive(self) -> bool:
        return not self._gone and not self.link.dead

    def hand_over(self) -> None:
        """An executor owns it now (and kills it when done): ``discard`` does nothing more."""
        with self._lock:
            self._gone = True

    def discard(self) -> None:
        """Kill it now; reap it (a blocking zygote request) off the caller's thread."""
        with self._lock:
            if self._gone:
                return
            self._gone = True
        self.link.dead = True
        _kill_group(self.pid)
        _close_transport(self.transport)
        _finish_reader(self.link.read_task)
        with contextlib.suppress(RuntimeError):  # interpreter exit: the zygote reaps all
            _host_pool().submit(self.zygote.reap, self.pid)


async def _recycle(pool: WorkerPool, key: Any, warm: _WarmWorker, uses: int) -> None:
    """Reset a closed REPL's worker and give it to ``pool``, or kill it."""
    try:
        reply = await warm.link.command({"op": "reset"}, _RESET_TIMEOUT_S)
    except (TimeoutError, _WorkerLost, ConnectionError, OSError):
        reply = {}
    if reply.get("op") != "clean" or reply.get("ok") is not True:
        pool.note_refused()
        warm.discard()
        return
    if pool.give(key, warm, uses):
        # Weakly: a timer must not keep a dropped pool (and so its workers) alive.
        asyncio.get_running_loop().call_later(pool.idle_s + 0.5, _expire, weakref.ref(pool))


def _expire(pool_ref: weakref.ref[WorkerPool]) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.expire()


def _schedule_recycle(pool: WorkerPool, key: Any, warm: _WarmWorker, uses: int) -> None:
    loop = warm.link.read_task.get_loop()
    if loop.is_closed():
        warm.discard()
        return

    def start() -> None:
        _hold(loop.create_task(_recycle(pool, key, warm, uses)))

    try:
        if loop is _running_loop():
            start()
        else:
            loop.call_soon_threadsafe(start)
    except RuntimeError:  # the loop is closed: nothing will reuse it
        warm.discard()


def _hold(task: asyncio.Task[None]) -> None:
    """Keep ``task`` referenced until it ends (on its loop's thread)."""
    _recycling.add(task)
    task.add_done_callback(_recycling.discard)


def _finish_reader(task: asyncio.Task[None]) -> None:
    """Cancel a discarded worker's channel reader and hold it until it has ended.

    Its stream protocol refers to the reader only weakly, so once nothing else holds
    the link the pending reader would be collected mid-wait (a warning at best).
    """
    loop = task.get_loop()

    def finish() -> None:
        _hold(task)
        task.cancel()

    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs any more
        loop.call_soon_threadsafe(finish)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -- the executor ----------------------------------------------------------------------


@dataclass
class _RawResult:
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
        self._tools: dict[str, Callable[..., Any]] = _wrap_tools(tools)
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
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _Resources.release, self._res)
        _live.add(self)
        self._link: _Link | None = None
        self._restart: asyncio.Task[_Link] | None = None
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

        Starts the worker if it has not started yet. Keys: ``wall_timeout_kill``,
        ``network_namespace``, ``filesystem_jail``, ``uid_drop`` (a leased uid of its
        own), ``pid_namespace``, ``disk_limit`` (a private tmpfs of ``disk_limit_mb``),
        ``capabilities_dropped``, ``empty_environment``, ``private_cwd``, ``rlimit_as``,
        ``rlimit_cpu``, ``rlimit_fsize``, ``rlimit_nofile``, ``rlimit_nproc``,
        ``rlimit_core`` (booleans), ``kill_scope`` (what a kill reaches:
        ``"pid_namespace"``, ``"uid"`` or ``"process_group"``) and ``notes`` (why
        something is missing).
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
                fut.set_exception(_WorkerLost(None, reason))

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
        if self._pool is not None and link is not None and self._reusable(link):
            handed = self._res.disown(link.pid)
            if handed is not None:
                link.bind(None)
                _schedule_recycle(self._pool, self._pool_key(), _WarmWorker(link, *handed),
                                  self._uses)
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

    def _run_raw(self, code: str, timeout: float = 10.0) -> _RawResult:
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
            return _RawResult(error=msg["error"])
        if not msg.get("ok"):
            return _RawResult(error=msg.get("error"))
        return _RawResult(value=msg.get("value"), repr=msg.get("repr"))

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

    async def _ensure_worker(self) -> _Link:
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

    def _reusable(self, link: _Link) -> bool:
        """Whether ``link``'s worker is idle and whole: no command or request in flight."""
        busy = self._lock is not None and self._lock.locked()
        return not (busy or link.dead or link.timed_out or link.reply is not None or link.tasks
                    or link.pulls)

    async def _spawn(self) -> _Link:
        if self._closed:
            raise EnvClosedError("this REPL environment is closed; create a new one")
        if self._pool is not None:
            while True:
                taken = self._pool.take(self._pool_key())
                if taken is None:
                    self._pool.note_started()
                    break
                warm, uses = taken
                assert isinstance(warm, _WarmWorker)
                try:
                    return await self._load_warm(warm, uses)
                except SandboxError:
                    continue  # it died while idle or failed to load (and is buried): next
        self._uses = 1
        return await self._start_fresh()

    async def _load_warm(self, warm: _WarmWorker, uses: int) -> _Link:
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
        link.bind(self)
        self._link = link
        self._uses = uses + 1
        return await self._load(link)

    async def _start_fresh(self) -> _Link:
        loop = asyncio.get_running_loop()
        zygote = await loop.run_in_executor(_host_pool(), _get_zygote)
        self._plan = zygote.plan
        self._res.check_open()
        spec = self._spec()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid, uid = await loop.run_in_executor(_host_pool(), zygote.spawn, spec, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._res.adopt(pid, uid, zygote)
        reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
        self._res.attach(writer.transport)
        link = self._link = _Link(self, pid, reader, writer)
        return await self._load(link)

    async def _load(self, link: _Link) -> _Link:
        """Send the REPL (context, tools, setup code, caps) to ``link``'s worker; wait ready."""
        writer = link.writer
        kind, total, chunks = _encode_context(self._context)
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
            ready = await self._await_ready(link)
        except (TimeoutError, _WorkerLost, ConnectionError) as exc:
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
        self._protections = self._summarise(ready.get("protections") or {})
        return link

    async def _await_ready(self, link: _Link) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        link.reply = fut
        if link.dead:
            raise link.lost or _WorkerLost(None)
        try:
            return await asyncio.wait_for(fut, self._start_timeout)
        finally:
            link.reply = None

    def _summarise(self, reported: dict[str, Any]) -> dict[str, bool | str]:
        prot: dict[str, bool | str] = {key: bool(reported.get(key)) for key in PROTECTION_KEYS}
        prot["wall_timeout_kill"] = True
        prot["rlimit_cpu"] = self.cpu_limit_s is not None and bool(reported.get("rlimit_as"))
        if prot["pid_namespace"]:
            scope = "pid_namespace"
        elif prot["uid_drop"]:
            scope = "uid"
        else:
            scope = "process_group"
        prot["kill_scope"] = scope
        # What cells may do because of the OS layer: open() in the private root, and the
        # data libraries (names, comma-separated; empty when none).
        prot["file_access"] = bool(reported.get("file_access"))
        data = reported.get("data_modules")
        prot["data_modules"] = data if isinstance(data, str) else ""
        notes = []
        if self._plan.get("note"):
            notes.append(str(self._plan["note"]))
        if scope == "uid":
            notes.append(
                "no PID namespace: on close every process of the worker's own uid is killed"
            )
        elif scope == "process_group":
            notes.append(
                "no PID namespace and no own uid: a process that leaves the worker's group "
                "(double fork plus setsid) can outlive close()"
            )
        if not prot["disk_limit"]:
            notes.append(
                "no private tmpfs: disk use is bounded per file (file_limit_mb), not in total"
            )
        if not prot["rlimit_nproc"]:
            notes.append(
                "RLIMIT_NPROC is not in force: the worker could not leave the kernel's root "
                "uid, for which the limit is ignored"
            )
        if self.cpu_limit_s is None:
            notes.append("no CPU limit (cpu_limit_s=None): the wall timeout bounds each cell")
        prot["notes"] = "; ".join(notes)
        return prot

    async def _bury(self, link: _Link) -> int | None:
        """Make sure ``link``'s worker is dead and reaped; return its wait status."""
        if self._link is link:
            self._link = None
        # A channel that simply closed means the worker died on its own: wait a moment
        # for its real wait status (the words the cell gets) before killing the rest.
        died = link.lost is not None and not link.lost.reason and not link.timed_out
        link.dead = True
        for task in link.tasks.values():
            task.cancel()
        loop = asyncio.get_running_loop()
        status = await loop.run_in_executor(
            _host_pool(), self._res.kill, link.pid, _DEATH_STATUS_WAIT_S if died else 0.0
        )
        link.writer.transport.close()
        link.read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await link.read_task
        return status

    async def _command(self, msg: dict[str, Any], limit: float | None = 60.0) -> dict[str, Any]:
        async with self._the_lock():
            link = await self._ensure_worker()
            try:
                return await link.command(msg, limit)
            except (TimeoutError, _WorkerLost) as exc:
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
            # busy with other envs' traffic must not make the kill late.
            token = None if limit is None else _deadlines.arm(limit, self._deadline_kill, link)
            try:
                reply = await link.command(msg, None if limit is None else limit + 1.0)
            except (TimeoutError, _WorkerLost) as exc:
                if isinstance(exc, _WorkerLost) and not link.timed_out:
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
            finally:
                if token is not None:
                    _deadlines.cancel(token)
            return self._outcome(reply)

    def _deadline_kill(self, link: _Link) -> None:
        """On the deadline thread: SIGKILL the cell's worker, whatever the loop is doing."""
        link.timed_out = True
        self._res.kill_now(link.pid)

    def _died(self, link: _Link, what: str) -> CellOutcome:
        return CellOutcome(
            stdout="".join(link.partial["stdout"]),
            stderr="".join(link.partial["stderr"]),
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

    async def _serve(self, link: _Link, msg: dict[str, Any]) -> None:
        """Answer one request from the worker (a sub-query, a batch or a tool call)."""
        rid = msg.get("id")
        try:
            if msg["op"] == "batch":
                result = await self._serve_batch(link, msg)
            else:
                result = await self._handle(msg)
            data = pack({"op": "reply", "id": rid, "ok": True, "result": result})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the cell
            text = _short(exc) if msg["op"] != "tool" else _describe(exc)
            data = pack(
                {"op": "reply", "id": rid, "ok": False, "error": text, "type": type(exc).__name__}
            )
        if not link.dead:
            link.writer.write(data)

    async def _handle(self, msg: dict[str, Any]) -> Any:
        # The worker is not trusted: everything it asks for is checked again here with the
        # policy's own checks, so even a subverted worker can only make ordinary requests.
        op = msg["op"]
        if op == "tool":
            return await self._call_tool(msg.get("name"), msg.get("args"), msg.get("kwargs"))
        params = _params(msg)
        prompt = msg.get("prompt")
        check_subquery_prompt(prompt)
        return await self._sub_queries.query(prompt, params)

    async def _serve_batch(self, link: _Link, msg: dict[str, Any]) -> None:
        """Run a batch the worker announced, pulling its prompts as this env's slots free.

        The gate asks for one slice at a time; each slice's replies go back to the
        worker as soon as they are in, so the host never holds the whole batch, in
        either direction.
        """
        params = _params(msg)
        rid, n = msg.get("id"), msg.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise TypeError("llm_query_batch takes a list of prompts")

        async def fetch(start: int, count: int, budget: int) -> list[Any]:
            return await link.pull(rid, start, count, budget)

        def deliver(start: int, replies: list[Any]) -> None:
            link.send({"op": "part", "id": rid, "start": start, "results": replies})

        await self._sub_queries.run_batch(n, fetch, deliver, params)

    async def _call_tool(self, name: Any, args: Any, kwargs: Any) -> Any:
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError(f"no tool named {name!r}")
        if inspect.iscoroutinefunction(tool):
            result = await tool(*args, **kwargs)
        else:
            # A sync tool may block: run it off the engine loop.
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(_tool_pool(), functools.partial(tool, *args, **kwargs))
        try:
            return json.loads(json.dumps(result))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"tool {name!r} returned a {type(result).__name__}, which cannot be sent to "
                "the process sandbox (only JSON-like values can)"
            ) from exc


# -- helpers ---------------------------------------------------------------------------


def _encode_context(context: Any) -> tuple[str, int, Iterator[bytes | memoryview]]:
    """How to send ``context``: its kind, its byte length, and chunks produced lazily."""
    if context is None:
        return "none", 0, iter(())
    if isinstance(context, str):
        if context.isascii():
            # An ASCII str's length is its UTF-8 length: encode slice by slice, so the
            # host never holds a second full copy.
            n = len(context)
            return (
                "str",
                n,
                (
                    context[i : i + _CONTEXT_CHUNK].encode("ascii")
                    for i in range(0, n, _CONTEXT_CHUNK)
                ),
            )
        return "str", *_chunks(context.encode("utf-8", "surrogatepass"))
    if isinstance(context, (bytes, bytearray, memoryview)):
        return "bytes", *_chunks(bytes(context) if isinstance(context, memoryview) else context)
    try:
        data = json.dumps(context, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"the process sandbox sends the context to its worker as JSON, and a "
            f"{type(context).__name__} is not JSON-like ({exc}); pass a str, bytes, list "
            "or dict, or use sandbox='local'"
        ) from exc
    return "json", *_chunks(data)


def _chunks(data: bytes | bytearray) -> tuple[int, Iterator[memoryview]]:
    view = memoryview(data)
    return len(data), (view[i : i + _CONTEXT_CHUNK] for i in range(0, len(data), _CONTEXT_CHUNK))


def _params(msg: dict[str, Any]) -> dict[str, Any]:
    params = msg.get("params")
    if not isinstance(params, dict):
        raise TypeError("llm_query parameters must be keyword arguments")
    check_subquery_params(params)
    return params


def _check_code(code: Any) -> None:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, not {type(code).__name__}")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


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
