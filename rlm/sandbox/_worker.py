"""Child side of the process sandbox: the zygote (template) process and the workers it forks.

The host starts one zygote per host process with an empty environment. The zygote
imports the sandbox policy and every module a cell may import, enters a private network
namespace, then waits on its control socket; each ``spawn`` request forks a worker that
confines itself (own session, working directory, filesystem jail, unprivileged uid,
resource limits) before it reads a single byte of user code. Forking a warm template is
what makes a worker start in milliseconds instead of the ~100 ms of a fresh interpreter.

Everything that crosses a process boundary is JSON in length-prefixed frames (never
pickle): a frame is ``!IQ`` (JSON length, raw payload length), the JSON object, then the
raw payload, which only the host uses, to send a large context without JSON-escaping it.

This module is imported by the host too, for the frame format; it must stay free of
host-only state.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import os
import queue
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlm.sandbox import _isolation as isolation

HEADER = struct.Struct("!IQ")
# Upper bounds on what either side accepts in one frame. A worker that announces more is
# broken or hostile; the host drops it rather than allocate what it asks for.
MAX_JSON = 256 * 1024 * 1024
MAX_PAYLOAD = 1 << 40
CONTROL_MAX = 1 << 20

# Exit statuses a worker uses for its own failures (the host turns them into words).
EXIT_BROKEN = 70
EXIT_OUT_OF_MEMORY = 86


# Modules a cell may reach only through the policy. They are imported here, before the
# fork, so a worker never touches the filesystem to import (its root is its own empty
# working directory) and every worker shares their pages with the zygote.
PRELOAD = (
    "asyncio",
    "base64",
    "bisect",
    "collections",
    "collections.abc",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "json",
    "math",
    "numbers",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "textwrap",
    "time",
    "traceback",
    "typing",
    "unicodedata",
    "_strptime",
    "resource",
    "concurrent.futures",
    "rlm.sandbox.compiler",
    "rlm.sandbox.guards",
    "rlm.sandbox.safe_builtins",
    "rlm.sandbox.modules",
    "rlm.sandbox.subqueries",
    "rlm.sandbox.cells",
    "rlm.sandbox.local",
    "rlm.sandbox.flow",
)


# -- frames ---------------------------------------------------------------------------


def pack(msg: dict[str, Any], payload_len: int = 0) -> bytes:
    """Encode ``msg`` as one frame header plus its JSON; the raw payload follows separately."""
    body = json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )
    return HEADER.pack(len(body), payload_len) + body


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    """Read one frame from a blocking socket; raises EOFError when the peer is gone."""
    json_len, payload_len = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if json_len > MAX_JSON or payload_len > MAX_PAYLOAD:
        raise EOFError
    msg = json.loads(_recv_exact(sock, json_len))
    payload = _recv_exact(sock, payload_len) if payload_len else bytearray()
    return msg, payload


_CONTROL_HEADER = struct.Struct("!I")


def control_send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one control message: a length, the JSON, and any fds riding on its first bytes.

    The control channel is a stream socket on every platform (macOS has no Unix
    SOCK_SEQPACKET, and a datagram peer never sees the other end close).
    """
    body = json.dumps(msg).encode()
    data = _CONTROL_HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def control_recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """Read one control message and the fds sent with it; (None, fds) at end of stream."""
    fds: list[int] = []
    head = b""
    while len(head) < _CONTROL_HEADER.size:
        if max_fds and not head:
            chunk, got, _flags, _addr = socket.recv_fds(sock, _CONTROL_HEADER.size, max_fds)
            fds.extend(got)
        else:
            chunk = sock.recv(_CONTROL_HEADER.size - len(head))
        if not chunk:
            return None, fds
        head += chunk
    (length,) = _CONTROL_HEADER.unpack(head)
    if length > CONTROL_MAX:
        raise ValueError("control message too large")
    try:
        body = _recv_exact(sock, length)
    except EOFError:
        return None, fds
    return json.loads(body), fds


# -- OS helpers -----------------------------------------------------------------------


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces() -> dict[str, Any]:
    """Put the zygote (and so every worker) in a network namespace with no interfaces up.

    As root a plain network namespace is enough, and workers later drop to their own uid.
    Otherwise an unprivileged user namespace (plus a mount namespace, so workers may
    chroot) carries the network namespace; inside it the zygote is root with
    capabilities that reach only its own namespaces, and workers shed them before user
    code runs.
    """
    plan: dict[str, Any] = {
        "netns": False,
        "userns": False,
        "can_chroot": False,
        "note": "",
        "host_uid": os.geteuid(),
    }
    if not sys.platform.startswith("linux"):
        plan["note"] = f"no namespaces on {sys.platform}"
        plan["can_chroot"] = os.geteuid() == 0
        return plan
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        try:
            isolation.unshare(isolation.CLONE_NEWNET)
            plan.update(netns=True, can_chroot=True)
            return plan
        except OSError as exc:
            plan["note"] = f"network namespace as root failed ({exc.strerror}); "
    try:
        isolation.unshare(
            isolation.CLONE_NEWUSER | isolation.CLONE_NEWNS | isolation.CLONE_NEWNET
        )
    except OSError as exc:
        plan["note"] += f"user namespace unavailable ({exc.strerror})"
        plan["can_chroot"] = uid == 0
        return plan
    with contextlib.suppress(OSError):
        _write_file("/proc/self/setgroups", "deny")
    try:
        _write_file("/proc/self/uid_map", f"0 {uid} 1")
        _write_file("/proc/self/gid_map", f"0 {gid} 1")
    except OSError as exc:
        plan["note"] += f"user namespace id map failed ({exc.strerror})"
    plan.update(netns=True, userns=True, can_chroot=True)
    return plan


def _plan_isolation(plan: dict[str, Any]) -> None:
    """Find out which per-worker isolation this machine grants, once, in the zygote.

    ``pidns``: each worker in its own PID namespace. ``tmpfs``: each worker's root a
    private size-limited tmpfs mounted on ``mountpoint`` (the temp directory, covered
    only inside the worker's own mount namespace). ``drop_uid``: workers take leased uids
    (a root host outside a user namespace).
    """
    plan["drop_uid"] = os.geteuid() == 0 and not plan["userns"]
    plan["pidns"] = isolation.probe_pid_namespace()
    plan["tmpfs"] = False
    plan["mountpoint"] = None
    if plan["can_chroot"] and sys.platform.startswith("linux"):
        # Any existing directory will do: the tmpfs covers it only inside the worker's
        # own mount namespace, so nothing is created (or left behind) on the host.
        mountpoint = tempfile.gettempdir()
        if isolation.probe_private_tmpfs(mountpoint):
            plan["tmpfs"] = True
            plan["mountpoint"] = mountpoint


def _preload_data_modules() -> None:
    """Import numpy, pandas and yaml when installed, before the jail hides site-packages.

    Their math libraries would start a thread pool per core on import, and threads do
    not survive a fork; one thread each is what a worker wants anyway. The variables
    are removed again so workers still start with an empty environment.
    """
    import importlib

    from rlm.sandbox.modules import DATA_MODULES

    single = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    added = [name for name in single if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    try:
        for name in DATA_MODULES:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    finally:
        for name in added:
            os.environ.pop(name, None)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _preload_data_modules()
    # Codecs load lazily by name; inside the jail no module can be found later, so load
    # them all now (a cell may call str.encode with any codec name).
    import encodings
    import pkgutil

    for info in pkgutil.iter_modules(encodings.__path__):
        with contextlib.suppress(Exception):
            importlib.import_module(f"encodings.{info.name}")
    # OpenSSL reads its configuration on first use; do it while files are reachable.
    import hashlib

    for algo in ("md5", "sha1", "sha256", "sha512"):
        with contextlib.suppress(ValueError):
            hashlib.new(algo, b"")
    time.localtime()
    _warm_policy()


def _warm_policy() -> None:
    """Run the policy once in the zygote: every allowed import, a top-level await, an error.

    Module facades are built and cached here, and any module the policy or the stdlib
    imports lazily on those paths is loaded, so a worker never needs the filesystem.
    """
    import asyncio

    from rlm.sandbox import cells, compiler, local, modules

    allowed = [m for m in modules.ALLOWED_MODULES if m != "__future__"]
    source = "".join(f"import {m}\n" for m in allowed) + (
        "import datetime\n"
        "datetime.datetime.strptime('2024-01-02', '%Y-%m-%d')\n"
        "'é'.encode('latin-1')\n"
        "async def warm():\n"
        "    return 1\n"
        "x = await warm()\n"
        "undefined_name\n"
    )
    sink: list[str] = []
    ns = cells.build_namespace(write_stdout=sink.append, write_stderr=sink.append, extra={})
    loop = asyncio.new_event_loop()
    try:
        cell = compiler.compile_cell(source, "<warm-up>")
        try:
            cells.run_cell(cell, ns, loop)
        except BaseException as exc:  # noqa: BLE001 - the NameError is the point
            cells.format_user_error(exc, cell, ns)
        with contextlib.suppress(compiler.PolicyError):
            compiler.compile_cell("def f(:\n", "<warm-up>")
        local._timeout_reason(1.0)
    finally:
        loop.close()


# -- zygote ---------------------------------------------------------------------------


@dataclass
class _Child:
    """What the zygote keeps per worker: its init's status pipe, uid lease and directory."""

    status_fd: int
    uid: int | None
    directory: str | None


class _Zygote:
    """The template process: serves spawn and reap requests from the host, one at a time.

    Each spawn forks an *init* (in its own PID namespace when the kernel allows) that
    builds the worker's private root, forks the worker itself and then only waits,
    relaying the worker's wait status through a pipe. The host addresses a worker by
    its init's pid: killing the init ends the PID namespace, so every process the
    worker made dies with it.
    """

    def __init__(self, control: socket.socket, plan: dict[str, Any]) -> None:
        self.control = control
        self.plan = plan
        self.children: dict[int, _Child] = {}
        self.lingering: set[int] = set()
        self.uids = isolation.UidPool(check_processes=not plan["pidns"]) if plan["drop_uid"] else None
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if plan["pidns"] else -1

    def serve(self) -> None:
        while True:
            try:
                request, fds = control_recv(self.control, 4)
            except (OSError, ValueError):
                request, fds = None, []
            if request is None:
                self.shutdown()
            self._reap_lingering()
            try:
                reply = self._handle(request, fds)
            except Exception as exc:  # noqa: BLE001 - a bad request must not end the zygote
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            control_send(self.control, reply)

    def _handle(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = request.get("op")
        if op == "spawn":
            if len(fds) != 1:
                raise ValueError("spawn needs exactly one channel fd")
            return {"ok": True, **self._spawn(request["spec"], fds[0])}
        if op == "reap":
            grace = min(float(request.get("grace") or 0.0), 1.0)
            return {"ok": True, "status": self._kill_and_reap(int(request["pid"]), grace)}
        raise ValueError(f"unknown op {op!r}")

    def _spawn(self, spec: dict[str, Any], channel_fd: int) -> dict[str, Any]:
        plan = self.plan
        uid = self.uids.acquire() if self.uids is not None else None
        directory = None
        if not plan["tmpfs"]:
            # A directory no worker has ever seen; removed (without following links)
            # once every process that could write to it is gone.
            directory = tempfile.mkdtemp(prefix="rlm-sandbox-")
        status_r, status_w = os.pipe()
        pid = -1
        if plan["pidns"]:
            isolation.unshare(isolation.CLONE_NEWPID)
        try:
            pid = os.fork()
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            if uid is not None and self.uids is not None:
                self.uids.release(uid)
            raise
        finally:
            if plan["pidns"] and pid != 0:
                # Children forked later must not land in this worker's namespace.
                isolation.setns(self.own_pidns, isolation.CLONE_NEWPID)
        if pid == 0:
            status = EXIT_BROKEN
            try:
                os.close(status_r)
                self.control.close()
                _Init(spec, plan, uid, directory, channel_fd, status_w).run()
            except BaseException:  # noqa: BLE001 - an init never returns into the zygote
                status = EXIT_BROKEN
            os._exit(status)
        os.close(channel_fd)
        os.close(status_w)
        self.children[pid] = _Child(status_r, uid, directory)
        return {"pid": pid, "uid": uid}

    def _kill_and_reap(self, pid: int, grace: float = 0.0, wait_s: float = 2.0) -> int | None:
        child = self.children.get(pid)
        if child is None:
            raise ValueError(f"pid {pid} is not a worker of this zygote")
        if grace > 0:
            # A worker that died on its own: give its init a moment to relay the status.
            with contextlib.suppress(OSError, ValueError):
                select.select([child.status_fd], [], [], grace)
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(OSError):
                kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                # Stuck in the kernel (uninterruptible sleep): reap it later rather than
                # block every other env's spawn behind it.
                self.lingering.add(pid)
                return None
            time.sleep(0.002)
        relayed = self._relayed_status(child)
        self._bury(pid)
        return relayed if relayed is not None else status

    @staticmethod
    def _relayed_status(child: _Child) -> int | None:
        try:
            data = os.read(child.status_fd, 4)
        except OSError:
            return None
        return struct.unpack("!i", data)[0] if len(data) == 4 else None

    def _bury(self, pid: int) -> None:
        """The init is reaped: release what the worker held, once nothing can use it."""
        child = self.children.get(pid)
        if child is None:
            return
        if child.uid is not None and not self.plan["pidns"]:
            # Without a PID namespace, processes that left the worker's group may live
            # on: sweep the uid; keep its lease (and the directory) while any survive.
            if not isolation.kill_uid(child.uid):
                self.lingering.add(pid)
                return
        del self.children[pid]
        with contextlib.suppress(OSError):
            os.close(child.status_fd)
        if child.uid is not None and self.uids is not None:
            self.uids.release(child.uid)
        if child.directory is not None:
            shutil.rmtree(child.directory, ignore_errors=True)

    def _reap_lingering(self) -> None:
        for pid in list(self.lingering):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.lingering.discard(pid)
            self._bury(pid)

    def shutdown(self) -> None:
        """The host is gone or closing: kill every worker, reap them, exit."""
        for pid in self.children:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(OSError):
                    kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._bury(pid)
        os._exit(0)


class _Init:
    """First process of a worker (pid 1 of its PID namespace where available), as root.

    It gives the worker its private root (a fresh tmpfs in a new mount namespace, or a
    fresh directory), chroots, forks the worker, closes everything else and waits. When
    the worker dies it writes the worker's wait status to the zygote and exits, which
    (in a PID namespace) makes the kernel kill whatever the worker left behind.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        plan: dict[str, Any],
        uid: int | None,
        directory: str | None,
        channel_fd: int,
        status_w: int,
    ) -> None:
        self.spec, self.plan, self.uid = spec, plan, uid
        self.directory, self.channel_fd, self.status_w = directory, channel_fd, status_w

    def run(self) -> None:
        spec, plan = self.spec, self.plan
        os.setsid()
        if sys.platform.startswith("linux"):
            isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        jail = {"private_cwd": False, "filesystem_jail": False, "disk_limit": False}
        if plan["tmpfs"]:
            isolation.mount_private_tmpfs(plan["mountpoint"], spec["disk_bytes"], self.uid)
            os.chdir(plan["mountpoint"])
            jail["disk_limit"] = True
        else:
            assert self.directory is not None
            isolation.enter_fresh_directory(self.directory, self.uid)
        jail["private_cwd"] = True
        if plan["can_chroot"]:
            try:
                os.chroot(".")
                os.chdir("/")
                jail["filesystem_jail"] = True
            except OSError:
                pass
        init_pid = os.getpid()
        worker = os.fork()
        if worker == 0:
            status = EXIT_BROKEN
            try:
                os.close(self.status_w)
                channel = socket.socket(fileno=self.channel_fd)
                _Worker(channel, spec, plan, init_pid, self.uid, jail).run()
                status = 0
            except EOFError:
                status = 0
            except MemoryError:
                status = EXIT_OUT_OF_MEMORY
            except BaseException:  # noqa: BLE001 - a worker never returns into its init
                status = EXIT_BROKEN
            os._exit(status)
        # Keep nothing a worker could use: only the status pipe and stdio stay open.
        os.closerange(3, self.status_w)
        os.closerange(self.status_w + 1, 1 << 16)
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(EXIT_BROKEN)
            except InterruptedError:
                continue
            if pid == worker:
                with contextlib.suppress(OSError):
                    os.write(self.status_w, struct.pack("!i", status))
                os._exit(0)


def zygote_main(control_fd: int) -> None:
    """Entry point of the zygote process (started by the host with an empty environment)."""
    # Python's locale coercion puts LC_CTYPE back into a blank environment; workers must
    # see nothing at all.
    os.environ.clear()
    control = socket.socket(fileno=control_fd)
    os.chdir("/")
    _preload()
    plan = _enter_namespaces()
    _plan_isolation(plan)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    # Everything imported so far is shared with every worker; freezing keeps the cyclic
    # collector from touching (and so copying) those pages in each worker.
    gc.collect()
    gc.freeze()
    control_send(control, {"op": "ready", "plan": plan})
    # From here on nothing the zygote or a worker prints can reach the host's terminal.
    os.dup2(devnull, 2)
    os.close(devnull)
    _Zygote(control, plan).serve()


# -- worker ---------------------------------------------------------------------------


class _Worker:
    """One forked worker: confines itself, loads the context, then runs cells on request."""

    def __init__(
        self,
        channel: socket.socket,
        spec: dict[str, Any],
        plan: dict[str, Any],
        init_pid: int,
        uid: int | None,
        jail: dict[str, bool],
    ) -> None:
        self.channel = channel
        self.spec = spec
        self.plan = plan
        self.init_pid = init_pid
        self.uid = uid
        self.jail = jail
        self.send_lock = threading.Lock()
        self.commands: queue.SimpleQueue[tuple[dict[str, Any], bytearray | None]] = (
            queue.SimpleQueue()
        )
        self.waiters: dict[int, tuple[str, concurrent.futures.Future[Any]]] = {}
        self.waiters_lock = threading.Lock()
        self.next_id = 0
        self.protections: dict[str, Any] = {}
        self.batches: dict[int, _OutBatch] = {}
        self.outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        # Replaced by the env's own caps when its init message arrives.
        self.limits = flow_limits()
        self.max_frame = MAX_JSON
        # One deadline thread for the worker's life, whichever REPL it serves.
        self.watchdog = _Watchdog()
        self.session: _Session | None = None
        # Its private root (an fd, so a reset finds it whatever a cell did) and the
        # threads it runs by design: what a reset checks it is back to.
        self.root_fd = -1
        self.root_mode = 0o700
        self.fixed_threads: set[int] = set()

    # channel ------------------------------------------------------------------------
    #
    # One writer thread owns the socket's sending side, so no other thread ever blocks
    # on a full socket: not the cell (which must notice its deadline) and not the
    # reader (which must keep draining the host's replies, or both sides could wait on
    # each other).

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one message for the host; raises _TooLarge past the host's frame cap."""
        self.outbox.put(self._frame(msg))

    def send_now(self, msg: dict[str, Any]) -> None:
        """Send from the calling thread: output of a cell that may never release the GIL
        again (a long C call about to be killed) must leave before the writer could run."""
        data = self._frame(msg)
        with self.send_lock:
            self.channel.sendall(data)

    def send_reply(self, msg: dict[str, Any]) -> None:
        """Queue a command's answer, replacing a too-large value with an error saying so."""
        try:
            self.send(msg)
        except _TooLarge as exc:
            self.send(_shrunk(msg, exc.size, self.max_frame))

    def _frame(self, msg: dict[str, Any]) -> bytes:
        data = pack(msg)
        if len(data) - HEADER.size > self.max_frame:
            raise _TooLarge(len(data) - HEADER.size)
        return data

    def _write_loop(self) -> None:
        try:
            while True:
                data = self.outbox.get()
                with self.send_lock:
                    self.channel.sendall(data)
        except OSError:  # the host is gone: the reader sees EOF and ends the worker
            return

    def _read_loop(self) -> None:
        try:
            while True:
                msg, payload = recv_frame(self.channel)
                op = msg.get("op")
                if op == "reply":
                    self._resolve(msg)
                elif op == "pull":
                    self._pull(msg)
                elif op == "part":
                    self._part(msg)
                else:
                    # Only an init (the next REPL on a reused worker) carries a payload.
                    self.commands.put((msg, payload if op == "init" else None))
        except EOFError:  # the host closed the channel (or died): nothing left to do
            os._exit(0)
        except MemoryError:
            os._exit(EXIT_OUT_OF_MEMORY)
        except BaseException:  # noqa: BLE001 - a broken frame: the host reports the death
            os._exit(EXIT_BROKEN)

    def _resolve(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id", -1)
        with self.waiters_lock:
            entry = self.waiters.pop(rid, None)
            batch = self.batches.pop(rid, None)
        if entry is None:
            return
        op, future = entry
        try:
            if not msg.get("ok"):
                future.set_exception(_remote_error(op, msg))
            elif batch is None:
                future.set_result(msg.get("result"))
            elif batch.filled != len(batch.results):
                future.set_exception(_remote_error(op, {"error": "the batch came back incomplete"}))
            else:
                future.set_result(batch.results)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile (the cell was stopped)

    def _pull(self, msg: dict[str, Any]) -> None:
        """The host has room: send it the next slice of a batch (at least one prompt)."""
        rid, start = msg["id"], int(msg["start"])
        count, budget = int(msg["count"]), int(msg["max_bytes"])
        with self.waiters_lock:
            batch = self.batches.get(rid)
        prompts: list[Any] = []
        if batch is not None and 0 <= start < len(batch.items):
            end, used = start, 0
            stop = min(start + max(count, 1), len(batch.items))
            while end < stop and (end == start or used + batch.sizes[end] <= budget):
                used += batch.sizes[end]
                end += 1
            prompts = batch.items[start:end]
        while True:
            try:
                self.send({"op": "items", "id": rid, "start": start, "prompts": prompts})
                return
            except _TooLarge:
                # JSON escaping made the slice too big for one frame: send fewer prompts.
                if len(prompts) <= 1:
                    prompts = []
                else:
                    prompts = prompts[: len(prompts) // 2]

    def _part(self, msg: dict[str, Any]) -> None:
        rid, start, replies = msg.get("id"), msg.get("start"), msg.get("results")
        with self.waiters_lock:
            batch = self.batches.get(rid)
            if batch is None or not isinstance(start, int) or not isinstance(replies, list):
                return
            if start < 0 or start + len(replies) > len(batch.results):
                return
            batch.results[start : start + len(replies)] = replies
            batch.filled += len(replies)

    def submit(self, op: str, **fields: Any) -> concurrent.futures.Future[Any]:
        """Send a request to the host; the future resolves when its reply arrives.

        The sync stubs block on it with the policy's ``wait_for_future`` (so a stopped
        cell stops waiting), the async ones await it; many can be in flight at once.
        Cancelling the future (a stopped cell) tells the host to drop the request.
        """
        return self._submit(op, None, fields)

    def submit_batch(self, items: list[Any], params: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """Announce a batch after checking the env's caps; the host pulls its prompts.

        Only the count crosses now; the host asks for slices as its slots free up, and
        sends each slice's replies back as they finish.
        """
        from rlm.sandbox import flow

        flow.check_batch_size(len(items), self.limits)
        sizes = [flow.prompt_bytes(p) for p in items]
        for i, size in enumerate(sizes):
            flow.check_prompt_size(size, self.limits, i)
        batch = _OutBatch(items, sizes, [None] * len(items))
        return self._submit("batch", batch, {"n": len(items), "params": params})

    def check_prompt(self, prompt: Any) -> None:
        """Refuse a single prompt over ``max_prompt_bytes`` before it is sent."""
        from rlm.sandbox import flow

        flow.check_prompt_size(flow.prompt_bytes(prompt), self.limits)

    def _submit(
        self, op: str, batch: _OutBatch | None, fields: dict[str, Any]
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self.waiters_lock:
            self.next_id += 1
            rid = self.next_id
            self.waiters[rid] = (op, future)
            if batch is not None:
                self.batches[rid] = batch
        try:
            data = self._frame({"op": op, "id": rid, **fields})
        except (TypeError, ValueError, _TooLarge) as exc:
            with self.waiters_lock:
                self.waiters.pop(rid, None)
                self.batches.pop(rid, None)
            what = f"tool {fields.get('name')!r}" if op == "tool" else "llm_query"
            if isinstance(exc, _TooLarge):
                raise TypeError(
                    f"the arguments of {what} are {exc.size:,} bytes once encoded, more than "
                    f"the {self.max_frame:,} that can reach the host process; pass less data"
                ) from None
            raise TypeError(
                f"the arguments of {what} must be JSON-like data (str, int, float, bool, None, "
                f"lists and dicts) to reach the host process: {exc}"
            ) from None
        future.add_done_callback(lambda f: f.cancelled() and self._cancel(rid))
        self.outbox.put(data)
        return future

    def _cancel(self, rid: int) -> None:
        with self.waiters_lock:
            self.waiters.pop(rid, None)
            self.batches.pop(rid, None)
        with contextlib.suppress(OSError):
            self.send({"op": "cancel", "id": rid})

    # confinement --------------------------------------------------------------------

    def confine(self) -> None:
        """Apply every OS protection this machine allows, before any user code exists.

        The init already made the private root and chrooted into it; here the worker
        drops every descriptor but its channel, sets its limits and leaves root.
        """
        import resource

        spec, plan, prot = self.spec, self.plan, self.protections
        ch = self.channel.fileno()
        os.closerange(3, ch)
        os.closerange(ch + 1, 1 << 16)
        self.root_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        self.root_mode = os.fstat(self.root_fd).st_mode & 0o7777
        os.setsid()
        if sys.platform.startswith("linux"):
            isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.init_pid:
            os._exit(0)
        # A file bigger than the limit is refused (EFBIG), not fatal.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        prot.update(self.jail)
        prot["pid_namespace"] = bool(plan["pidns"])
        uid = self.uid

        limits = {
            "rlimit_as": (getattr(resource, "RLIMIT_AS", None), spec.get("as_bytes")),
            "rlimit_fsize": (resource.RLIMIT_FSIZE, spec.get("fsize_bytes")),
            "rlimit_nofile": (resource.RLIMIT_NOFILE, spec.get("nofile")),
            "rlimit_nproc": (getattr(resource, "RLIMIT_NPROC", None), spec.get("nproc")),
            "rlimit_core": (resource.RLIMIT_CORE, 0),
        }
        for key, (which, value) in limits.items():
            prot[key] = False
            if which is None or value is None:
                continue
            try:
                resource.setrlimit(which, (value, value))
                prot[key] = True
            except (OSError, ValueError):
                pass
        prot["uid_drop"] = False
        dropped = False
        if uid is not None:
            try:
                os.setgroups([])
                # Leaving uid 0 for good (real, effective and saved) clears every
                # capability; as root, setuid sets all three where setresuid is missing.
                if hasattr(os, "setresuid"):
                    os.setresgid(uid, uid, uid)
                    os.setresuid(uid, uid, uid)
                else:
                    os.setgid(uid)
                    os.setuid(uid)
                prot["uid_drop"] = dropped = True
            except OSError:
                pass
        elif plan["userns"]:
            # Root inside our own user namespace: its capabilities reach only our
            # namespaces, but chroot escapes need them, so shed them all.
            dropped = isolation.drop_capabilities()
        elif os.geteuid() != 0:
            dropped = True
        if sys.platform.startswith("linux"):
            isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
        prot["capabilities_dropped"] = dropped
        # The kernel never applies RLIMIT_NPROC to the host's real root (kuid 0), whatever
        # namespace it is in; it bounds a worker only under a non-root kernel uid.
        kernel_root = os.geteuid() == 0 if not plan["userns"] else plan.get("host_uid") == 0
        prot["rlimit_nproc"] = prot["rlimit_nproc"] and not kernel_root
        prot["network_namespace"] = plan["netns"]
        prot["empty_environment"] = not os.environ

    # main ---------------------------------------------------------------------------

    def run(self) -> None:
        self.confine()
        init, payload = recv_frame(self.channel)
        if init.get("op") != "init":
            return
        writer = threading.Thread(target=self._write_loop, name="rlm-writer", daemon=True)
        writer.start()
        reader = threading.Thread(target=self._read_loop, name="rlm-channel", daemon=True)
        reader.start()
        self.fixed_threads = {threading.main_thread().ident or 0, writer.ident or 0, reader.ident or 0}
        while True:
            self._begin(init, payload)
            del payload
            init, payload = self._serve(init)

    def _begin(self, init: dict[str, Any], payload: bytearray | None) -> None:
        """Load one REPL: its caps, context, namespace and setup code; report ready."""
        from rlm.sandbox.flow import max_frame_bytes

        context = _decode_context(init.get("context_kind", "none"), payload or bytearray())
        del payload
        self.limits = flow_limits(init.get("limits") or {})
        self.max_frame = max_frame_bytes(self.limits)
        self.session = _Session(self, init, context)
        del context
        setup_error = self.session.setup()
        self.send({"op": "ready", "protections": self.protections, "setup_error": setup_error})

    def _serve(self, init: dict[str, Any]) -> tuple[dict[str, Any], bytearray | None]:
        """Run the REPL's commands until a reset; return the next REPL's init message."""
        session = self.session
        assert session is not None
        while True:
            msg, _ = self.commands.get()
            op = msg.get("op")
            if op == "exec":
                _set_cpu_limit(msg.get("cpu"))
                self.send_reply(session.run_cell(msg["code"], msg.get("timeout"), msg["filename"]))
            elif op == "get":
                self.send_reply(session.get(msg["name"]))
            elif op == "raw" and init.get("allow_raw"):
                self.send_reply(_run_raw(msg["code"]))
            elif op == "reset":
                del session
                problems = self._reset()
                self.send({"op": "clean", "ok": not problems, "problems": problems})
                if problems:
                    # The host kills a worker that is not clean; do not wait for it.
                    time.sleep(0.5)
                    os._exit(0)
                nxt, payload = self.commands.get()
                if nxt.get("op") != "init":
                    os._exit(0)
                return nxt, payload

    # reuse --------------------------------------------------------------------------

    def _reset(self) -> list[str]:
        """Forget the REPL just served; the problems that forbid serving another.

        Drops the namespace, event loop, pending requests and output, removes every file
        from the private root, then checks the worker is back to what it was when it
        started: its own threads only, no child process, no extra open file, an empty
        root. Any doubt is a problem (the host then kills the worker instead).
        """
        problems: list[str] = []
        session, self.session = self.session, None
        if session is not None:
            if session.data_imported:
                problems.append("a data library was imported (its settings are process-wide)")
            session.close()
            del session
        with self.waiters_lock:
            pending = list(self.waiters.values())
            self.waiters.clear()
            self.batches.clear()
        for _op, future in pending:
            future.cancel()
        gc.collect()
        # decimal's context belongs to the thread cells run on (this one), and a cell may
        # change it (getcontext().prec = 3): the next REPL starts from the default, which
        # cells cannot change.
        import decimal

        decimal.setcontext(decimal.Context())
        # A CPU limit is set per cell from the REPL's cpu_limit_s; the next REPL may have
        # none, so none may be left in force.
        import resource

        with contextlib.suppress(OSError, ValueError):
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        if not problems:
            problems.extend(self._wipe_root())
        extra_threads = [t.name for t in threading.enumerate()
                         if t.ident not in self.fixed_threads and t is not self.watchdog.thread]
        if extra_threads:
            problems.append(f"threads left running: {', '.join(extra_threads)[:200]}")
        try:
            os.waitpid(-1, os.WNOHANG)
            problems.append("a child process exists")
        except ChildProcessError:
            pass
        fixed_fds = {0, 1, 2, self.channel.fileno(), self.root_fd}
        nofile = int(self.spec.get("nofile") or 64)
        for fd in range(min(nofile, 4096)):
            if fd in fixed_fds:
                continue
            try:
                os.fstat(fd)
            except OSError:
                continue
            problems.append(f"file descriptor {fd} is open")
            break
        return problems

    def _wipe_root(self) -> list[str]:
        """Remove everything in the private root, as the worker's own uid, never
        following a link; a tree too deep or too big to walk is a problem, not a risk."""
        import stat

        if self.root_fd < 0:
            return []
        budget = [20_000]

        def wipe(dir_fd: int, depth: int) -> None:
            if depth > 24:
                raise OSError("directory tree too deep to clear")
            for name in os.listdir(dir_fd):
                budget[0] -= 1
                if budget[0] < 0:
                    raise OSError("too many files to clear")
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    # Only this thread of this process runs now, so the entry cannot be
                    # swapped between the check and the open (O_NOFOLLOW regardless).
                    os.chmod(name, 0o700, dir_fd=dir_fd)
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                    try:
                        wipe(fd, depth + 1)
                    finally:
                        os.close(fd)
                    os.rmdir(name, dir_fd=dir_fd)
                else:
                    os.unlink(name, dir_fd=dir_fd)

        try:
            os.fchmod(self.root_fd, self.root_mode)
            wipe(self.root_fd, 0)
            left = os.listdir(self.root_fd)
        except OSError as exc:
            return [f"its files could not be cleared ({exc.strerror or exc})"]
        return [f"{len(left)} files remain in its root"] if left else []


def _remote_error(op: str, msg: dict[str, Any]) -> Exception:
    """The exception a failed host request raises in the cell."""
    text = str(msg.get("error") or "the host could not answer")
    if op != "tool":
        from rlm.sandbox.subqueries import LLMQueryError

        return LLMQueryError(text)
    # A tool's own exception type when it is a builtin one (ValueError, KeyError...), so
    # cell code can catch it as it would in-process; anything else as a RuntimeError.
    import builtins

    kind = getattr(builtins, str(msg.get("type")), None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        with contextlib.suppress(Exception):
            return kind(text)
    return RuntimeError(f"{msg.get('type')}: {text}")


@dataclass
class _OutBatch:
    """A batch the worker announced: its prompts (pulled by the host) and replies so far."""

    items: list[Any]
    sizes: list[int]
    results: list[Any]
    filled: int = 0


class _TooLarge(Exception):
    """A message larger than the host accepts in one frame."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def _shrunk(msg: dict[str, Any], size: int, limit: int) -> dict[str, Any]:
    """``msg`` with its bulky value replaced by an error the model can act on."""
    what = f"{size:,} bytes, more than the {limit:,} the process sandbox sends to the host"
    op = msg.get("op")
    if op == "result":
        cap = 4096
        return {
            "op": "result",
            "stdout": str(msg.get("stdout") or "")[:cap],
            "stderr": str(msg.get("stderr") or "")[:cap],
            "error": f"ValueError: the cell's result (its FINAL answer and output) is {what}; "
            "give FINAL a shorter answer",
            "final": None,
            "truncated": True,
        }
    if op == "value":
        return {"op": "value", "ok": True, "value": None, "repr": f"a value of {what}"}
    return {"op": op, "ok": False, "error": f"the reply is {what}"}


def flow_limits(options: dict[str, Any] | None = None) -> Any:
    """The env's sub-query caps (``rlm.sandbox.flow.SubQueryLimits``) from the init message."""
    from rlm.sandbox.flow import SubQueryLimits

    return SubQueryLimits(**{k: int(v) for k, v in (options or {}).items()})


def _set_cpu_limit(seconds: float | None) -> None:
    import resource

    if seconds is None:
        return
    used = resource.getrusage(resource.RUSAGE_SELF)
    budget = int(used.ru_utime + used.ru_stime + seconds + 0.999)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(
            resource.RLIMIT_CPU, (budget, resource.getrlimit(resource.RLIMIT_CPU)[1])
        )


def _decode_context(kind: str, payload: bytearray) -> Any:
    if kind == "none":
        return None
    if kind == "str":
        return payload.decode("utf-8", "surrogatepass")
    if kind == "bytes":
        return bytes(payload)
    if kind == "json":
        return json.loads(payload)
    raise ValueError(f"unknown context kind {kind!r}")


def _jsonable(value: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "value": json.loads(json.dumps(value))}
    except (TypeError, ValueError, RecursionError):
        return {"ok": True, "value": None, "repr": repr(value)[:2000]}


def _run_raw(code: str) -> dict[str, Any]:
    """Test hook: run Python with no policy at all, to show the OS layer holds alone."""
    ns: dict[str, Any] = {"__name__": "__raw__"}
    try:
        exec(compile(code, "<raw>", "exec"), ns)
    except BaseException as exc:  # noqa: BLE001 - report, never die, like a cell
        return {"op": "raw_result", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"op": "raw_result", **_jsonable(ns.get("result"))}


class _Watchdog:
    """Calls a running cell's CellStop at its deadline, like the local executor's waiter.

    The policy's checks then end a Python-level loop with CellTimeout and the REPL keeps
    its variables; a cell stuck in one C call cannot notice, and the host kills the
    whole worker a moment later.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.stop: Callable[[str], None] | None = None
        self.deadline = 0.0
        self.reason = ""
        self.thread: threading.Thread | None = None

    def arm(self, stop: Callable[[str], None], timeout: float | None, reason: str) -> None:
        if timeout is None:
            return
        with self.cond:
            self.stop, self.deadline, self.reason = stop, time.monotonic() + timeout, reason
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="rlm-watchdog", daemon=True)
                self.thread.start()
            self.cond.notify()

    def disarm(self) -> None:
        with self.cond:
            self.stop = None

    def _watch(self) -> None:
        while True:
            with self.cond:
                while self.stop is None or time.monotonic() < self.deadline:
                    if self.stop is None:
                        self.cond.wait()
                    else:
                        self.cond.wait(max(self.deadline - time.monotonic(), 0.0))
                stop, reason, self.stop = self.stop, self.reason, None
            stop(reason)


class _Session:
    """The cell-running half of a worker: the policy's namespace, output and llm_query stubs.

    It does what ``LocalExecutor`` does, with the same policy functions and messages;
    only the llm_query family and tools differ, being stubs that ask the host.
    """

    def __init__(self, worker: _Worker, init: dict[str, Any], context: Any) -> None:
        import asyncio

        from rlm.sandbox import cells

        self.worker = worker
        self.setup_code: str | None = init.get("setup_code")
        self.limit = int(init.get("max_output_chars", 20_000))
        self.memory_limit_mb = init.get("memory_limit_mb")
        self.out = cells.OutputBuffer(self.limit)
        self.err = cells.OutputBuffer(self.limit)
        # What a killed cell still shows: the head of its output, sent as it is written.
        self.streamed = 0
        self.last_flush = 0.0
        self.loop = asyncio.new_event_loop()
        self.watchdog = worker.watchdog
        self.data_imported = False
        extra: dict[str, Any] = {"context": context}
        extra.update(self._llm_functions())
        extra.update(self._tool_stubs(init.get("tools") or []))
        # Files and the data libraries only where the OS, not the policy, bounds them: a
        # private root, no network, no privileges. They are reported with the protections.
        prot = worker.protections
        confined = bool(
            prot.get("filesystem_jail") and prot.get("network_namespace")
            and prot.get("capabilities_dropped")
        )
        from rlm.sandbox.modules import DATA_MODULES

        data = tuple(m for m in DATA_MODULES if confined and m in sys.modules)
        prot["file_access"] = confined
        prot["data_modules"] = ", ".join(data)
        self.ns = cells.build_namespace(
            write_stdout=lambda text: self._write("stdout", text),
            write_stderr=lambda text: self._write("stderr", text),
            extra=extra,
            file_access=confined,
            data_modules=data,
            on_data_import=self._note_data_import,
        )

    def _note_data_import(self, name: str) -> None:
        self.data_imported = True

    def close(self) -> None:
        """Drop everything this REPL made: its namespace (the context with it) and its
        cell loop (tasks a cell started were cancelled when that cell ended)."""
        from rlm.sandbox import cells

        cells.release_namespace(self.ns)
        with contextlib.suppress(Exception):
            self.loop.close()

    # output -------------------------------------------------------------------------

    def _write(self, stream: str, text: str) -> None:
        (self.out if stream == "stdout" else self.err).write(text)
        room = self.limit - self.streamed
        if room <= 0 or not text:
            return
        part = text[:room]
        self.streamed += len(part)
        now = time.monotonic()
        # Throttled so a print loop does not become a message per line; the result
        # carries the full (capped) output anyway, this is only for a cell that dies.
        if now - self.last_flush >= 0.02 or self.streamed >= self.limit:
            self.last_flush = now
            with contextlib.suppress(OSError):
                self.worker.send_now({"op": "out", "stream": stream, "text": part})

    # cells --------------------------------------------------------------------------

    def setup(self) -> str | None:
        if not self.setup_code:
            return None
        return self._run(self.setup_code, None, "<setup>")["error"]

    def run_cell(self, code: str, timeout: float | None, filename: str) -> dict[str, Any]:
        return self._run(code, timeout, filename)

    def _run(self, code: str, timeout: float | None, filename: str) -> dict[str, Any]:
        from rlm.sandbox import cells, compiler
        from rlm.sandbox.local import _timeout_reason

        self.out = cells.OutputBuffer(self.limit)
        self.err = cells.OutputBuffer(self.limit)
        self.streamed = 0
        self.last_flush = 0.0
        error: str | None = None
        final: Any = None
        try:
            try:
                cell = compiler.compile_cell(code, filename)
            except compiler.PolicyError as exc:
                error = str(exc)
            else:
                reason = _timeout_reason(timeout)
                try:
                    cells.run_cell(
                        cell,
                        self.ns,
                        self.loop,
                        on_start=lambda stop: self.watchdog.arm(stop, timeout, reason),
                    )
                except BaseException as exc:  # noqa: BLE001 - every fault of user code is reported
                    error = cells.format_user_error(exc, cell, self.ns)
                    if isinstance(exc, MemoryError) and self.memory_limit_mb:
                        error += (
                            f"\nThe process sandbox limits the REPL to {self.memory_limit_mb} MB"
                            " of memory (memory_limit_mb); the REPL keeps its variables."
                        )
                    del exc
                finally:
                    self.watchdog.disarm()
                final = cells.take_final(self.ns)
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            error = error or f"{type(exc).__name__}: the REPL could not run the cell ({exc})"
        return {
            "op": "result",
            "stdout": self.out.getvalue(),
            "stderr": self.err.getvalue(),
            "error": error,
            "final": final,
            "truncated": self.out.truncated or self.err.truncated,
        }

    def get(self, name: str) -> dict[str, Any]:
        ns = self.ns
        if not isinstance(name, str) or name.startswith("_") or name not in ns:
            return {"op": "value", "ok": False}
        return {"op": "value", **_jsonable(ns[name])}

    # the llm_query family and tools -------------------------------------------------

    def _llm_functions(self) -> dict[str, Any]:
        """Stubs with the local executor's checks, errors and notes; the work is the host's."""
        import asyncio

        from rlm.sandbox import cells, subqueries
        from rlm.sandbox.local import _prompt_list, _short

        worker = self.worker
        LLMQueryError = subqueries.LLMQueryError  # noqa: N806 - the class, under its own name

        def note_failures(results: list[str]) -> None:
            failed = subqueries.count_failed_slots(results)
            if failed:
                self._write(
                    "stderr",
                    f"llm_query_batch: {failed} of {len(results)} sub-queries failed after "
                    "retries; their slots hold '[llm_query error: ...]' strings\n",
                )

        def llm_query(prompt: Any, **params: Any) -> str:
            """Ask a sub-model one prompt (a str or a list of chat messages); returns its reply."""
            subqueries.check_subquery_prompt(prompt)
            subqueries.check_subquery_params(params)
            worker.check_prompt(prompt)
            future = worker.submit("query", prompt=prompt, params=params)
            try:
                return cells.wait_for_future(self.ns, future)
            except Exception as exc:
                raise LLMQueryError(_short(exc)) from None

        def llm_query_batch(prompts: Any, **params: Any) -> list[str]:
            """Ask a sub-model many prompts concurrently; replies in order, failures as error strings."""
            items = _prompt_list(prompts)
            subqueries.check_subquery_params(params)
            if not items:
                return []
            future = worker.submit_batch(items, params)
            try:
                results = cells.wait_for_future(self.ns, future)
            except Exception as exc:
                raise LLMQueryError(_short(exc)) from None
            note_failures(results)
            return results

        async def llm_query_async(prompt: Any, **params: Any) -> str:
            """Async form of llm_query: ``await llm_query_async(prompt)``."""
            subqueries.check_subquery_prompt(prompt)
            subqueries.check_subquery_params(params)
            worker.check_prompt(prompt)
            future = worker.submit("query", prompt=prompt, params=params)
            try:
                return await asyncio.wrap_future(future)
            except Exception as exc:
                raise LLMQueryError(_short(exc)) from None

        async def llm_query_batch_async(prompts: Any, **params: Any) -> list[str]:
            """Async form of llm_query_batch: ``await llm_query_batch_async(prompts)``."""
            items = _prompt_list(prompts)
            subqueries.check_subquery_params(params)
            if not items:
                return []
            future = worker.submit_batch(items, params)
            try:
                results = await asyncio.wrap_future(future)
            except Exception as exc:
                raise LLMQueryError(_short(exc)) from None
            note_failures(results)
            return results

        return {
            "llm_query": llm_query,
            "llm_query_batch": llm_query_batch,
            "llm_query_async": llm_query_async,
            "llm_query_batch_async": llm_query_batch_async,
        }

    def _tool_stubs(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        """A function per host tool; calling it runs the tool in the host (JSON in, JSON out)."""
        return {spec["name"]: self._tool_stub(spec) for spec in tools}

    def _tool_stub(self, spec: dict[str, Any]) -> Callable[..., Any]:
        import asyncio

        name = str(spec["name"])
        from rlm.sandbox import cells

        worker = self.worker
        stub: Callable[..., Any]
        if spec.get("async"):

            async def async_tool(*args: Any, **kwargs: Any) -> Any:
                return await asyncio.wrap_future(
                    worker.submit("tool", name=name, args=args, kwargs=kwargs)
                )

            stub = async_tool
        else:

            def tool(*args: Any, **kwargs: Any) -> Any:
                future = worker.submit("tool", name=name, args=args, kwargs=kwargs)
                return cells.wait_for_future(self.ns, future)

            stub = tool
        stub.__name__ = stub.__qualname__ = name
        stub.__doc__ = spec.get("doc")
        return stub
