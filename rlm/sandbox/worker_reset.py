"""A worker's reset between two REPLs: forget the one served, check it is back to its start.

The reset drops the REPL's namespace, event loop, pending requests and output, puts
process-wide state a cell may change back to its default, removes every file from the
private root, and then checks that the worker is what it was when it started: its own
threads only, no child process, no extra open descriptor, an empty root. It returns the
problems it found; any problem means the worker must not serve another REPL.

What the reset says is the worker's own claim: the host believes a reported problem
(it kills the worker) but never takes "clean" as proof; whether a worker may be lent
again is the host's decision from what it saw (see ``rlm.sandbox.worker_pool``).
Worker-side only; it holds no request loop (see ``worker``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import stat
import threading
from dataclasses import dataclass, field

from rlm.sandbox.worker_channel import WorkerChannel

__all__ = ["Baseline", "forget_process_state", "reset", "wipe_root"]


@dataclass
class Baseline:
    """What a worker is when it starts: the threads it runs by design, the descriptors it
    keeps, its private root (a descriptor, so a reset finds it whatever a cell did) and
    the root's mode, and how many descriptors it may have open."""

    threads: set[int] = field(default_factory=set)
    fds: set[int] = field(default_factory=set)
    root_fd: int = -1
    root_mode: int = 0o700
    nofile: int = 64


def reset(channel: WorkerChannel, baseline: Baseline, *, wipe: bool = True) -> list[str]:
    """Forget what the REPL just served left behind; the problems that forbid serving
    another (if any). Its session must be closed and dropped first (``Session.close``).

    ``wipe=False`` skips clearing the root (a worker already known to be retired). Any
    doubt is a problem: the host then kills the worker instead of lending it.
    """
    problems: list[str] = []
    channel.drop_pending()
    gc.collect()
    forget_process_state()
    if wipe:
        problems.extend(wipe_root(baseline.root_fd, baseline.root_mode))
    extra_threads = [t.name for t in threading.enumerate() if t.ident not in baseline.threads]
    if extra_threads:
        problems.append(f"threads left running: {', '.join(extra_threads)[:200]}")
    try:
        os.waitpid(-1, os.WNOHANG)
        problems.append("a child process exists")
    except ChildProcessError:
        pass
    for fd in range(min(baseline.nofile, 4096)):
        if fd in baseline.fds:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue
        problems.append(f"file descriptor {fd} is open")
        break
    return problems


def forget_process_state() -> None:
    """Put process-wide state a cell may have changed back to what a fresh worker has.

    This is the one place a reset clears state shared by every REPL of the process,
    the stdlib caches a cell can write to among it (``shared_state``).
    """
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
    # The stdlib caches a cell can write to (re, _strptime, typing, functools...): the
    # namespace's release clears them too; a reset does it again whatever the session did.
    from rlm.sandbox.shared_state import clear_shared_state

    clear_shared_state()


def wipe_root(root_fd: int, root_mode: int) -> list[str]:
    """Remove everything in the private root, as the worker's own uid, never following a
    link; a tree too deep or too big to walk is a problem (returned), not a risk."""
    if root_fd < 0:
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
        os.fchmod(root_fd, root_mode)
        wipe(root_fd, 0)
        left = os.listdir(root_fd)
    except OSError as exc:
        return [f"its files could not be cleared ({exc.strerror or exc})"]
    return [f"{len(left)} files remain in its root"] if left else []
