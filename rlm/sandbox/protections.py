"""The ``protections`` report: which OS protections a REPL's cells run under, in words.

The process executor reports what its worker confined itself to (see ``confine``)
plus what the host itself enforces (the wall-clock kill, the CPU limit per cell), with
``kill_scope`` and ``notes`` saying what is missing and what that means. The in-process
executor has none of them. This module only builds the report; it holds no executor.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROTECTION_KEYS", "local_report", "summarise"]

PROTECTION_KEYS = (
    "wall_timeout_kill",
    "network_namespace",
    "ipc_namespace",
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


def local_report() -> dict[str, bool | str]:
    """The report of the in-process executor: every OS protection off, and why."""
    report: dict[str, bool | str] = dict.fromkeys(PROTECTION_KEYS, False)
    report["kill_scope"] = "none"
    report["file_access"] = False
    report["data_modules"] = ""
    report["notes"] = (
        "sandbox='local' runs cells in this process: only the policy and its soft time "
        "limit apply; use sandbox='process' for OS-enforced limits"
    )
    return report


def summarise(
    reported: dict[str, Any], plan: dict[str, Any], cpu_limit_s: float | None
) -> dict[str, bool | str]:
    """The report of a process-sandbox REPL: what its worker ``reported`` of its
    confinement, the zygote's ``plan`` (for its note) and the REPL's CPU limit."""
    prot: dict[str, bool | str] = {key: bool(reported.get(key)) for key in PROTECTION_KEYS}
    # "own": a network namespace per worker; "shared": the zygote's, shared by its
    # workers (still no network); False: none.
    net = reported.get("network_namespace")
    prot["network_namespace"] = net if net in ("own", "shared") else False
    prot["wall_timeout_kill"] = True
    prot["rlimit_cpu"] = cpu_limit_s is not None and bool(reported.get("rlimit_as"))
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
    if plan.get("note"):
        notes.append(str(plan["note"]))
    if scope == "uid":
        notes.append(
            "no PID namespace: on close every process of the worker's own uid is killed"
        )
    elif scope == "process_group":
        notes.append(
            "no PID namespace and no own uid: a process that leaves the worker's group "
            "(double fork plus setsid) can outlive close()"
        )
    if prot["network_namespace"] == "shared":
        notes.append(
            "no network namespace per worker: workers share one without network, so two "
            "escaped workers could reach each other (abstract Unix sockets)"
        )
    if not prot["ipc_namespace"]:
        notes.append(
            "no IPC namespace: System V shared memory and message queues made after an "
            "escape are shared with the host and can outlive the worker"
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
    if cpu_limit_s is None:
        notes.append("no CPU limit (cpu_limit_s=None): the wall timeout bounds each cell")
    prot["notes"] = "; ".join(notes)
    return prot
