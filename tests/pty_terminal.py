"""A command on a pseudo-terminal, started without forking the (multi-threaded) test process.

``pexpect.spawn`` forks the test process itself (``pty.fork()``), and the test process
runs threads (fake servers, the engine loop): a fork then copies locks other threads
held, which can deadlock the child, and Python 3.12+ warns about it. Here the pty pair
is made in the test process and the command starts through ``subprocess`` (fork and
exec in C, with no Python code run in between) with the slave side as its stdin, stdout
and stderr, in a new session; a two-line launcher makes the pty its controlling
terminal (so Ctrl-C on the pty interrupts it) and execs the command. pexpect reads and
writes the master side through ``fdspawn``, with the process calls pexpect.spawn has.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
from collections.abc import Mapping, Sequence

from pexpect import fdpexpect

# Runs in the new session: the pty on fd 0 becomes its controlling terminal, then the
# real command replaces it.
_LAUNCHER = (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)

__all__ = ["PtyChild", "spawn"]


class PtyChild(fdpexpect.fdspawn):
    """A child process on a pty, read and written like ``pexpect.spawn``'s."""

    def __init__(self, proc: subprocess.Popen[bytes], master: int, *, timeout: float,
                 encoding: str | None) -> None:
        super().__init__(master, timeout=timeout, encoding=encoding)
        self.proc = proc
        self.exitstatus: int | None = None
        self.signalstatus: int | None = None

    def isalive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, force: bool = False) -> bool:
        if self.proc.poll() is None:
            (self.proc.kill if force else self.proc.terminate)()
        return True

    def sendintr(self) -> None:
        self.send("\x03")  # the terminal's interrupt character: SIGINT to the child

    def sendeof(self) -> None:
        self.send("\x04")  # the terminal's end-of-file character

    def close(self, force: bool = True) -> None:
        if self.child_fd != -1:
            super().close()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code < 0:
            self.signalstatus = -code
        else:
            self.exitstatus = code


def spawn(command: str, args: Sequence[str], *, env: Mapping[str, str], encoding: str = "utf-8",
          dimensions: tuple[int, int] = (24, 80), timeout: float = 30) -> PtyChild:
    """Start ``command args...`` on a new pty of ``dimensions`` (rows, columns)."""
    master, slave = os.openpty()
    rows, cols = dimensions
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, command, *args],
            stdin=slave, stdout=slave, stderr=slave, env=dict(env), start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the child holds it now: the master sees EOF when the child is gone
    return PtyChild(proc, master, timeout=timeout, encoding=encoding)
