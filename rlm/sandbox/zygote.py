"""The zygote (template process) of the process sandbox, as it runs: spawn and reap workers.

The host starts one zygote per host process with an empty environment
(``zygote_client``). The zygote imports the sandbox policy and every module a cell may
import (``preload``), enters the namespaces every worker shares (``confine``), then
serves the host's control requests one at a time: ``spawn`` forks a worker's init
(``worker_init``), which confines the worker before it reads a byte of user code;
``reap`` kills and reaps one. Forking a warm template is what makes a worker start in
milliseconds instead of the ~100 ms of a fresh interpreter.

This is the zygote's own side; the host's handle on it is ``zygote_client``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import shutil
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from rlm.sandbox import isolation
from rlm.sandbox.confine import enter_namespaces, plan_isolation
from rlm.sandbox.preload import preload
from rlm.sandbox.wire import EXIT_BROKEN, control_recv, control_send
from rlm.sandbox.worker_init import Init

__all__ = ["Zygote", "zygote_main"]


@dataclass
class Child:
    """What the zygote keeps per worker: its init's status pipe, uid lease and directory."""

    status_fd: int
    uid: int | None
    directory: str | None


class Zygote:
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
        self.children: dict[int, Child] = {}
        self.lingering: set[int] = set()
        self.uids = isolation.UidPool(check_processes=not plan["pidns"]) if plan["drop_uid"] else None
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if plan["pidns"] else -1

    def serve(self) -> None:
        """Answer the host's requests until its control socket closes; never returns."""
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
                Init(spec, plan, uid, directory, channel_fd, status_w).run()
            except BaseException:  # noqa: BLE001 - an init never returns into the zygote
                status = EXIT_BROKEN
            os._exit(status)
        os.close(channel_fd)
        os.close(status_w)
        self.children[pid] = Child(status_r, uid, directory)
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
    def _relayed_status(child: Child) -> int | None:
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


def zygote_main(control_fd: int) -> None:
    """Entry point of the zygote process (started by the host with an empty environment)."""
    # Python's locale coercion puts LC_CTYPE back into a blank environment; workers must
    # see nothing at all.
    os.environ.clear()
    control = socket.socket(fileno=control_fd)
    os.chdir("/")
    preload()
    plan = enter_namespaces()
    plan_isolation(plan)
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
    Zygote(control, plan).serve()
