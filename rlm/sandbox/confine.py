"""How the process sandbox confines code: the zygote's namespace plan, a worker's own steps.

Two moments, one concept. Once, in the zygote (template process): enter the namespaces
every worker starts from (``enter_namespaces``) and find out which per-worker isolation
this machine grants (``plan_isolation``); the resulting *plan* travels with every spawn
(each worker's init then enters namespaces of the worker's own: see ``worker_init``).
Then, in each worker, before a byte of user code exists (``confine_worker``): drop every
descriptor but the channel, set the resource limits, leave root, set no_new_privs, and
record what actually took effect as the worker's protections.

It uses the kernel primitives of ``isolation`` and holds no process management (see
``zygote`` and ``worker_init``) and nothing of the request loop (see ``worker``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from rlm.sandbox import isolation

__all__ = [
    "CHANNEL_FD",
    "Confinement",
    "confine_worker",
    "enter_namespaces",
    "place_channel",
    "plan_isolation",
]

# Where a worker keeps its channel: far above every descriptor its cells can create
# (RLIMIT_NOFILE is ``spec["nofile"]``, 64 by default), so none of theirs is ever it.
CHANNEL_FD = 1000


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces() -> dict[str, Any]:
    """Put the zygote in a network namespace with no interfaces up (every worker then
    gets one of its own where the kernel allows, else keeps this one).

    As root a plain network namespace is enough, and workers later drop to their own uid.
    Otherwise an unprivileged user namespace (plus a mount namespace, so workers may
    chroot) carries the network namespace; inside it the zygote is root with
    capabilities that reach only its own namespaces, and workers shed them before user
    code runs. Returns the plan (what holds), which ``plan_isolation`` completes.
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


def plan_isolation(plan: dict[str, Any]) -> None:
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


def place_channel(fd: int, nofile: int) -> int:
    """Move the channel descriptor ``fd`` out of the range a cell's own files use (to
    ``CHANNEL_FD``, above the descriptor limit set later), close-on-exec; the new number.

    Cells reach files by name only (``jail_files``); this keeps the channel clear of
    the descriptors they do get, and of the numbers code counting from 3 would guess.
    """
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    target = CHANNEL_FD if soft == resource.RLIM_INFINITY else min(CHANNEL_FD, soft - 1)
    if target <= max(fd, nofile):
        os.set_inheritable(fd, False)
        return fd
    os.dup2(fd, target, inheritable=False)
    os.close(fd)
    return target


@dataclass
class Confinement:
    """What ``confine_worker`` left in force: the protections report and the private root
    (a descriptor, so a reset finds it whatever a cell did, and its original mode)."""

    protections: dict[str, Any] = field(default_factory=dict)
    root_fd: int = -1
    root_mode: int = 0o700


def confine_worker(
    channel_fd: int,
    spec: dict[str, Any],
    plan: dict[str, Any],
    init_pid: int,
    uid: int | None,
    jail: dict[str, bool | str],
) -> Confinement:
    """Apply every OS protection this machine allows, before any user code exists.

    The init already made the private root, chrooted into it and entered the worker's
    own namespaces (``jail`` says what of that holds); here the worker drops every descriptor but its channel, sets its
    limits and leaves root. Exits the process if its init is already gone.
    """
    import resource

    done = Confinement()
    prot = done.protections
    os.closerange(3, channel_fd)
    os.closerange(channel_fd + 1, 1 << 16)
    done.root_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    done.root_mode = os.fstat(done.root_fd).st_mode & 0o7777
    os.setsid()
    if sys.platform.startswith("linux"):
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != init_pid:
        os._exit(0)
    # A file bigger than the limit is refused (EFBIG), not fatal.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    prot.update(jail)
    prot["pid_namespace"] = bool(plan["pidns"])

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
    prot["empty_environment"] = not os.environ
    return done
