"""Kernel isolation for the process sandbox: namespaces, the jail's file system, worker uids.

Used only by the zygote and the processes it forks (see ``zygote``). Everything here
assumes the code in a worker is fully hostile once it runs: it may have escaped the
policy and make any system call as the worker's uid. So:

- nothing privileged ever walks a path a worker could have touched: a worker's root is
  a fresh tmpfs mounted in its own mount namespace (or, without mount namespaces, a
  fresh directory chowned through a file descriptor before any worker code exists);
- every worker runs in its own PID namespace where the kernel allows it: killing the
  namespace's init (a tiny process that only relays the worker's exit status) makes the
  kernel kill every process in it, double forks and ``setsid()`` included;
- worker uids come from a machine-wide pool of leases (POSIX record locks on one
  root-owned file), and a uid is only released once no process can still hold it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import signal
import sys
import tempfile
import time
from typing import Any

# Workers of a root host run as uids leased from [UID_BASE, UID_BASE + UID_POOL_SIZE):
# far above any uid a distribution hands out.
UID_BASE = 0x7F000000
UID_POOL_SIZE = 1 << 20

# Linux constants (not all exposed by the os module on 3.11).
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000

# A worker's tmpfs holds at most this many files and directories (inodes cost kernel
# memory that the size limit does not count).
JAIL_INODES = 16384


def libc() -> Any:
    # ctypes is imported only here, by our own setup code; the policy makes it
    # unimportable for cells, so user code never reaches these calls.
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def unshare(flags: int) -> None:
    """unshare(2): os.unshare on 3.12+, libc before."""
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    _check(libc().unshare(flags))


def try_unshare(flags: int) -> bool:
    """unshare(2) where the kernel allows it: True if this process now has the new
    namespaces, False if it refused (no privileges, no support, not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        unshare(flags)
    except OSError:
        return False
    return True


def setns(fd: int, nstype: int) -> None:
    """setns(2): os.setns on 3.12+, libc before."""
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    _check(libc().setns(fd, nstype))


def prctl(option: int, arg: int) -> bool:
    try:
        return libc().prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def drop_capabilities() -> bool:
    """Empty every capability set (for a worker still uid 0 inside its user namespace)."""
    try:
        import ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [
                ("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32),
            ]

        header = Header(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (Data * 2)()
        return libc().capset(ctypes.byref(header), ctypes.byref(data)) == 0
    except (OSError, AttributeError):
        return False


def mount_private_tmpfs(target: str, size_bytes: int, uid: int | None) -> None:
    """In a fresh mount namespace: stop propagation, mount a size-limited tmpfs on target.

    The tmpfs is the worker's whole file system (it becomes its root): ``size`` bounds
    the bytes all its files may hold together, ``nr_inodes`` their number; no setuid
    bits, no device files, no executables.
    """
    unshare(CLONE_NEWNS)
    lib = libc()
    # Nothing mounted here may reach the host's namespace (systemd makes / shared).
    _check(lib.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None))
    kib = max(64, size_bytes // 1024)
    options = f"size={kib}k,nr_inodes={JAIL_INODES},mode=0700"
    if uid is not None:
        options += f",uid={uid},gid={uid}"
    _check(
        lib.mount(
            b"rlm-jail",
            target.encode(),
            b"tmpfs",
            _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
            options.encode(),
        )
    )


def enter_fresh_directory(path: str, uid: int | None) -> None:
    """Chdir into a directory created for this worker alone, chowning it by descriptor.

    ``path`` was made by the zygote a moment ago and no worker has run since, but the
    chown still goes through a descriptor opened without following links, so no path
    lookup as root can be redirected.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if uid is not None:
            os.fchown(fd, uid, uid)
            os.fchmod(fd, 0o700)
        os.fchdir(fd)
    finally:
        os.close(fd)


# -- what this machine allows --------------------------------------------------------


def _probe(fn: Any) -> bool:
    """Run ``fn`` in a throwaway child (namespace changes must not touch the zygote)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - any failure means "not available"
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def probe_pid_namespace() -> bool:
    """Can this process put each child in a new PID namespace, and reset afterwards?"""
    if not sys.platform.startswith("linux"):
        return False

    def attempt() -> None:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY)
        for _ in range(2):
            unshare(CLONE_NEWPID)
            setns(own, CLONE_NEWPID)

    return _probe(attempt)


def probe_private_tmpfs(mountpoint: str) -> bool:
    """Can a child mount a size-limited tmpfs in its own mount namespace?"""
    if not sys.platform.startswith("linux"):
        return False
    return _probe(lambda: mount_private_tmpfs(mountpoint, 1 << 20, None))


# -- worker uids ---------------------------------------------------------------------


def _lease_file() -> int | None:
    """Open (creating) the machine-wide uid lease file, only where root alone can write."""
    for base in ("/run", "/var/run", tempfile.gettempdir()):
        directory = os.path.join(base, "rlm-sandbox")
        with contextlib.suppress(FileExistsError, OSError):
            os.mkdir(directory, 0o700)
        try:
            info = os.lstat(directory)
            if not (
                os.path.isdir(directory)
                and not os.path.islink(directory)
                and info.st_uid == 0
                and info.st_mode & 0o022 == 0
            ):
                continue
            fd = os.open(
                os.path.join(directory, "uids.lock"),
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError:
            continue
        if os.fstat(fd).st_uid == 0:
            return fd
        os.close(fd)
    return None


class UidPool:
    """Leases of worker uids that are unique across every rlm host on this machine.

    A lease is a POSIX record lock on byte ``k`` of one root-owned file (uid
    ``UID_BASE + k``): the kernel drops it if this process dies, and two zygotes can
    never hold the same byte. Within one zygote, uids are handed out round-robin from a
    random start, so a released uid comes back only after a million others. Without
    PID namespaces a uid is also skipped while any process on the machine still runs
    as it (an orphan that escaped a kill).
    """

    def __init__(self, check_processes: bool) -> None:
        self.fd = _lease_file()
        self.check_processes = check_processes or self.fd is None
        self.next = random.randrange(UID_POOL_SIZE)
        self.held: set[int] = set()

    def acquire(self) -> int:
        for _ in range(UID_POOL_SIZE):
            k = self.next
            self.next = (k + 1) % UID_POOL_SIZE
            if k in self.held:
                continue
            if self.fd is not None:
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, k)
                except OSError:
                    continue  # leased by another host process
            uid = UID_BASE + k
            if self.check_processes and uid_in_use(uid):
                self._unlock(k)
                continue
            self.held.add(k)
            return uid
        raise OSError(errno.EAGAIN, "no free sandbox uid")

    def release(self, uid: int) -> None:
        k = uid - UID_BASE
        if k in self.held:
            self.held.discard(k)
            self._unlock(k)

    def _unlock(self, k: int) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, k)


def uid_in_use(uid: int) -> bool:
    """True if any process on this machine has ``uid`` as its real, effective or saved uid."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return False
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if str(uid).encode() in line.split()[1:]:
                            return True
                        break
        except OSError:
            continue
    return False


def kill_uid(uid: int, attempts: int = 50) -> bool:
    """SIGKILL every process running as ``uid``; True once none is left.

    A helper takes the uid and calls ``kill(-1, SIGKILL)``, which reaches exactly the
    processes that uid may signal (those whose real or saved uid it is), until nothing
    is left to kill: the one sweep no double fork or ``setsid()`` escapes.
    """
    for _ in range(attempts):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                for _ in range(1000):
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        code = 0
                        break
            except BaseException:  # noqa: BLE001 - reported through the exit status
                code = 1
            os._exit(code)
        os.waitpid(pid, 0)
        if not uid_in_use(uid):
            return True
        time.sleep(0.01)
    return False
