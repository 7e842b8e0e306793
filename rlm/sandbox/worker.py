"""A worker process's request loop: confine, load a REPL, run its commands, reset, repeat.

The worker's init forks it and calls ``Worker.run``. The worker confines itself first
(``confine``), before it reads a byte of user code; then it loads one REPL from the
host's ``init`` frame (caps, context, namespace, setup code) and serves that REPL's
commands (``exec``, ``get``, the test-only ``raw``) one at a time, until a ``reset``
makes it forget the REPL and wait for the next one's ``init`` (a warm worker).

Worker-side only: nothing here may import anything host-only. It holds the loop and
its order of events; the channel (``worker_channel``), the cells (``worker_session``)
and the reset (``worker_reset``) are apart.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from typing import Any

from rlm.sandbox.confine import confine_worker
from rlm.sandbox.context_codec import decode_context
from rlm.sandbox.modules import DATA_MODULES
from rlm.sandbox.watchdog import Watchdog
from rlm.sandbox.wire import recv_frame
from rlm.sandbox.worker_channel import WorkerChannel
from rlm.sandbox.worker_reset import Baseline, reset
from rlm.sandbox.worker_session import Session, jsonable

__all__ = ["Worker"]


class Worker:
    """One forked worker: confines itself, loads the context, then runs cells on request."""

    def __init__(
        self,
        channel: socket.socket,
        spec: dict[str, Any],
        plan: dict[str, Any],
        init_pid: int,
        uid: int | None,
        jail: dict[str, bool | str],
    ) -> None:
        self.channel = WorkerChannel(channel)
        self.spec = spec
        self.plan = plan
        self.init_pid = init_pid
        self.uid = uid
        self.jail = jail
        self.protections: dict[str, Any] = {}
        # One deadline thread for the worker's life, whichever REPL it serves.
        self.watchdog = Watchdog()
        self.session: Session | None = None
        self.baseline = Baseline(nofile=int(spec.get("nofile") or 64))
        self.file_access = False
        self.data_modules: tuple[str, ...] = ()

    def run(self) -> None:
        """Confine this process, then serve REPLs until the host closes the channel."""
        confined = confine_worker(
            self.channel.fileno(), self.spec, self.plan, self.init_pid, self.uid, self.jail
        )
        self.protections = confined.protections
        self.baseline.root_fd = confined.root_fd
        self.baseline.root_mode = confined.root_mode
        self.baseline.fds = {0, 1, 2, self.channel.fileno(), confined.root_fd}
        # Files and the data libraries only where the OS, not the policy, bounds them: a
        # private root, no network, no privileges. They are reported with the protections.
        prot = self.protections
        self.file_access = bool(
            prot.get("filesystem_jail") and prot.get("network_namespace")
            and prot.get("capabilities_dropped")
        )
        self.data_modules = tuple(m for m in DATA_MODULES if self.file_access and m in sys.modules)
        prot["file_access"] = self.file_access
        prot["data_modules"] = ", ".join(self.data_modules)
        # The one report the host believes, sent before any user code can exist here: a
        # reused worker's later words about itself are claims (see rlm.sandbox.process).
        self.channel.send_now({"op": "hello", "protections": prot})
        init, payload = recv_frame(self.channel.sock)
        if init.get("op") != "init":
            return
        threads = self.channel.start()
        self.baseline.threads = {threading.main_thread().ident or 0, *threads}
        while True:
            self._begin(init, payload)
            del payload
            init, payload = self._serve(init)

    def _begin(self, init: dict[str, Any], payload: bytearray | None) -> None:
        """Load one REPL: its caps, context, namespace and setup code; report ready."""
        context = decode_context(init.get("context_kind", "none"), payload or bytearray())
        del payload
        self.channel.set_limits(init.get("limits") or {})
        self.session = Session(
            self.channel, self.watchdog, init, context,
            file_access=self.file_access, data_modules=self.data_modules,
        )
        del context
        setup_error = self.session.setup()
        self.channel.send({"op": "ready", "setup_error": setup_error})

    def _serve(self, init: dict[str, Any]) -> tuple[dict[str, Any], bytearray | None]:
        """Run the REPL's commands until a reset; return the next REPL's init message."""
        session = self.session
        assert session is not None
        channel = self.channel
        while True:
            msg, _ = channel.commands.get()
            op = msg.get("op")
            if op == "exec":
                _set_cpu_limit(msg.get("cpu"))
                channel.send_reply(session.run_cell(msg["code"], msg.get("timeout"), msg["filename"]))
            elif op == "get":
                channel.send_reply(session.get(msg["name"]))
            elif op == "raw" and init.get("allow_raw"):
                channel.send_reply(_run_raw(msg["code"]))
            elif op == "reset":
                del session
                problems = self._reset()
                channel.send({"op": "clean", "ok": not problems, "problems": problems})
                if problems:
                    # The host kills a worker that is not clean; do not wait for it.
                    time.sleep(0.5)
                    os._exit(0)
                nxt, payload = channel.commands.get()
                if nxt.get("op") != "init":
                    os._exit(0)
                return nxt, payload

    def _reset(self) -> list[str]:
        """Forget the REPL just served; the problems that forbid serving another."""
        problems: list[str] = []
        session, self.session = self.session, None
        if session is not None:
            if session.data_imported:
                problems.append("a data library was imported (its settings are process-wide)")
            session.close()
            del session
        if self.watchdog.thread is not None:
            self.baseline.threads.add(self.watchdog.thread.ident or 0)
        problems.extend(reset(self.channel, self.baseline, wipe=not problems))
        return problems


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


def _run_raw(code: str) -> dict[str, Any]:
    """Test hook: run Python with no policy at all, to show the OS layer holds alone."""
    ns: dict[str, Any] = {"__name__": "__raw__"}
    try:
        exec(compile(code, "<raw>", "exec"), ns)
    except BaseException as exc:  # noqa: BLE001 - report, never die, like a cell
        return {"op": "raw_result", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"op": "raw_result", **jsonable(ns.get("result"))}
