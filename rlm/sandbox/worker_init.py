"""The first process of a worker (its init): private root, then the worker, then waiting.

The zygote forks an init per worker (pid 1 of a new PID namespace where the kernel
allows). The init, still privileged, enters an IPC and a network namespace of the
worker's own, gives the worker its private root (a fresh tmpfs in a new mount
namespace, or a fresh directory) and chroots into it, forks the worker
itself, closes every descriptor it does not need and then only waits. When the worker
dies it relays the worker's wait status to the zygote and exits, which (in a PID
namespace) makes the kernel kill whatever the worker left behind.

It never runs user code and never reads the channel; the worker's own confinement is
``confine``, its request loop ``worker``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
from typing import Any

from rlm.sandbox import isolation
from rlm.sandbox.confine import place_channel
from rlm.sandbox.wire import EXIT_BROKEN, EXIT_OUT_OF_MEMORY
from rlm.sandbox.worker import Worker

__all__ = ["Init"]


class Init:
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
        """Build the private root, fork the worker, relay its wait status; never returns."""
        spec, plan = self.spec, self.plan
        os.setsid()
        if sys.platform.startswith("linux"):
            isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        jail: dict[str, bool | str] = {
            "private_cwd": False, "filesystem_jail": False, "disk_limit": False,
        }
        # Its own System V IPC objects and its own network namespace (a loopback left
        # down): what it makes there is seen by no other worker and not by the host, and
        # it is gone with the worker. Where the kernel refuses, the worker keeps the
        # zygote's network namespace (still no network, but shared with other workers).
        jail["ipc_namespace"] = isolation.try_unshare(isolation.CLONE_NEWIPC)
        if isolation.try_unshare(isolation.CLONE_NEWNET):
            jail["network_namespace"] = "own"
        else:
            jail["network_namespace"] = "shared" if plan["netns"] else False
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
                fd = place_channel(self.channel_fd, int(spec.get("nofile") or 64))
                channel = socket.socket(fileno=fd)
                Worker(channel, spec, plan, init_pid, self.uid, jail).run()
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
