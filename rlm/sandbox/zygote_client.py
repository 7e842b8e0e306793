"""The host's handle on the zygote (template process): start it, ask it to spawn and reap.

One zygote per host process, started on first use with an empty environment and the
host's own import path (``get_zygote``), and again if it died. Requests are blocking
and one at a time over a control socket (see ``wire``); ``spawn`` hands the zygote one
end of a new worker's channel. What runs inside the zygote is ``zygote``; this module
holds only the host's side and must not hold workers' bookkeeping (see ``process``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from rlm.errors import SandboxError
from rlm.sandbox.wire import control_recv, control_send

__all__ = ["BOOT", "ZygoteClient", "get_zygote", "shutdown_zygote"]

_ZYGOTE_START_TIMEOUT_S = 60.0
_CONTROL_TIMEOUT_S = 30.0


# The zygote registers a bare ``rlm`` package instead of running ``rlm/__init__.py``: that
# would import the HTTP client stack (openai, ~1 s and tens of MB) into every worker,
# which needs only ``rlm.sandbox``.
BOOT = (
    "import sys, json, types\n"
    "sys.path[:0] = json.loads(sys.argv[2])\n"
    "pkg = types.ModuleType('rlm')\n"
    "pkg.__path__ = [sys.argv[3]]\n"
    "sys.modules['rlm'] = pkg\n"
    "from rlm.sandbox.zygote import zygote_main\n"
    "zygote_main(int(sys.argv[1]))\n"
)


class ZygoteClient:
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
                    BOOT,
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
        """The zygote process runs and its control socket is open."""
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
        """Stop the zygote (it kills every worker it forked first)."""
        with self.lock:
            self._stop()


_zygote_lock = threading.Lock()
_zygote: ZygoteClient | None = None


def get_zygote() -> ZygoteClient:
    """The zygote of this host process, started on first use (and again if it died)."""
    global _zygote
    with _zygote_lock:
        z = _zygote
        if z is None or z.owner_pid != os.getpid() or not z.alive:
            if z is not None and z.owner_pid == os.getpid():
                z.close()
            z = _zygote = ZygoteClient()
        return z


def shutdown_zygote() -> None:
    """Stop this host process's zygote (and so every worker it forked), if it runs."""
    global _zygote
    with _zygote_lock:
        z, _zygote = _zygote, None
    if z is not None and z.owner_pid == os.getpid():
        z.close()
