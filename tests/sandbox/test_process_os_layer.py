"""The process sandbox's OS layer holds on its own, with the policy bypassed.

Each test runs raw, unrestricted Python in a worker through the executor's test-only hook
(``_run_raw``, enabled by ``_allow_raw=True``; cells can never reach it) and shows that
the kernel, not the policy, stops the payload: no network, no environment, no files
outside the working directory, bounded memory, processes and file sizes, and a wall
timeout nothing inside the worker can resist. Where this machine does not grant a
protection, the test checks that ``protections`` says so instead.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rlm_support import pid_alive

from rlm.sandbox import zygote_client
from rlm.sandbox.isolation import UID_BASE
from rlm.sandbox.process import ProcessExecutor
from rlm.testing import FakeLLMServer


@pytest.fixture
def raw() -> Iterator[ProcessExecutor]:
    ex = ProcessExecutor(context="the context", _allow_raw=True, memory_limit_mb=512)
    ex.start()
    yield ex
    ex.close()


def _root(ex: ProcessExecutor) -> Path:
    """The worker's private root as the host sees it (through its init's /proc entry)."""
    return Path(f"/proc/{ex._res.pid}/root")


def _still_works(ex: ProcessExecutor) -> None:
    assert ex._run_raw("result = 6 * 7").value == 42


def test_worker_environment_is_empty_even_with_a_secret_in_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-os-layer-12345")
    # A fresh template process, started while the canary is in the host's environment.
    zygote_client.shutdown_zygote()
    with ProcessExecutor(_allow_raw=True) as ex:
        got = ex._run_raw("import os; result = dict(os.environ)")
        assert got.value == {}
        assert ex.protections["empty_environment"] is True
        zygote = zygote_client.get_zygote()
        # The template's own environment, as the kernel recorded it at exec time.
        assert Path(f"/proc/{zygote.proc.pid}/environ").read_bytes() == b""
        scan = ex._run_raw("import os\nresult = [k for k in os.environ if 'KEY' in k]\n")
        assert scan.value == []


def test_network_connect_to_a_host_server_fails(raw: ProcessExecutor) -> None:
    with FakeLLMServer() as srv:
        got = raw._run_raw(
            f"import socket\nsocket.create_connection(('127.0.0.1', {srv.port}), timeout=2)\n"
        )
        if raw.protections["network_namespace"]:
            assert got.error is not None
            assert "unreachable" in got.error.lower() or "refused" in got.error.lower()
            assert srv.requests == 0
        else:
            assert raw.protections["notes"]
    _still_works(raw)


def test_outbound_connect_fails(raw: ProcessExecutor) -> None:
    got = raw._run_raw("import socket; socket.create_connection(('1.1.1.1', 443), timeout=2)")
    if raw.protections["network_namespace"]:
        assert got.error is not None and "unreachable" in got.error.lower()
    else:
        assert "namespace" in str(raw.protections["notes"])


def test_host_files_are_invisible(raw: ProcessExecutor) -> None:
    got = raw._run_raw("result = open('/etc/passwd').read()")
    if raw.protections["filesystem_jail"]:
        assert got.error is not None and "FileNotFoundError" in got.error
        assert raw._run_raw("import os; result = os.listdir('/')").value == []
    else:
        assert "filesystem_jail" in raw.protections
    _still_works(raw)


def test_writes_land_only_in_the_private_directory(raw: ProcessExecutor, tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    got = raw._run_raw(f"open({str(canary)!r}, 'w').write('escaped')")
    assert got.error is not None
    assert not canary.exists()
    assert raw._run_raw("open('notes.txt', 'w').write('kept'); result = 'ok'").value == "ok"
    assert (_root(raw) / "notes.txt").read_text() == "kept"


def test_working_directory_is_removed_on_close() -> None:
    ex = ProcessExecutor(_allow_raw=True)
    ex._run_raw("open('a.txt', 'w').write('x')")
    root = _root(ex)
    assert (root / "a.txt").read_text() == "x"
    ex.close()
    ex.close()
    assert not (root / "a.txt").exists()


def test_worker_runs_as_its_own_unprivileged_uid(raw: ProcessExecutor) -> None:
    uid = raw._run_raw("import os; result = [os.getuid(), os.geteuid(), os.getgroups()]").value
    if raw.protections["uid_drop"]:
        assert uid[0] == uid[1] == raw._res.uid
        assert uid[0] >= UID_BASE
        assert uid[2] == []
    else:
        assert os.geteuid() != 0 or raw.protections["capabilities_dropped"] is True
    assert raw.protections["capabilities_dropped"] is True


def test_four_gigabytes_cannot_be_allocated(raw: ProcessExecutor) -> None:
    got = raw._run_raw("x = bytearray(4 * 2**30)")
    assert raw.protections["rlimit_as"] is True
    assert got.error is not None and got.error.startswith("MemoryError")
    _still_works(raw)


def test_a_huge_file_is_refused(raw: ProcessExecutor) -> None:
    got = raw._run_raw(
        "f = open('big.bin', 'wb')\n"
        "chunk = b'x' * (1 << 20)\n"
        "for _ in range(200):\n"
        "    f.write(chunk)\n"
        "    f.flush()\n"
    )
    assert raw.protections["rlimit_fsize"] is True
    assert got.error is not None and "File too large" in got.error
    assert (_root(raw) / "big.bin").stat().st_size <= 64 << 20
    _still_works(raw)


def test_fork_bomb_is_bounded(raw: ProcessExecutor) -> None:
    got = raw._run_raw(
        "import os\n"
        "n = 0\n"
        "try:\n"
        "    while n < 10000:\n"
        "        if os.fork() == 0:\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    result = [n, exc.errno]\n"
    )
    if raw.protections["rlimit_nproc"]:
        forks, errno_ = got.value
        assert forks < 16
        assert errno_ == 11  # EAGAIN: the per-uid process limit
    else:
        assert "RLIMIT_NPROC" in str(raw.protections["notes"])
    _still_works(raw)


def test_too_many_open_files_is_refused(raw: ProcessExecutor) -> None:
    got = raw._run_raw(
        "import socket\n"
        "keep = []\n"
        "try:\n"
        "    while len(keep) < 100000:\n"
        "        keep.extend(socket.socketpair())\n"
        "except OSError as exc:\n"
        "    result = [len(keep), exc.errno]\n"
    )
    assert raw.protections["rlimit_nofile"] is True
    opened, errno_ = got.value
    assert opened < 64
    assert errno_ == 24  # EMFILE
    _still_works(raw)


def test_ignored_signals_do_not_stop_the_kill(raw: ProcessExecutor) -> None:
    pid = raw._res.pid
    got = raw._run_raw(
        "import signal\n"
        "for s in signal.valid_signals():\n"
        "    try:\n"
        "        signal.signal(s, signal.SIG_IGN)\n"
        "    except (OSError, ValueError):\n"
        "        pass\n"
        "while True:\n"
        "    pass\n",
        timeout=1.0,
    )
    assert got.error is not None and "took too long" in got.error
    assert pid is not None and not pid_alive(pid)
    _still_works(raw)


def test_a_thread_that_outlives_the_timeout_dies_with_the_worker(raw: ProcessExecutor) -> None:
    pid = raw._res.pid
    got = raw._run_raw(
        "import threading, time\n"
        "def spin():\n"
        "    while True:\n"
        "        open('tick', 'a').write('.')\n"
        "        time.sleep(0.01)\n"
        "threading.Thread(target=spin).start()\n"
        "time.sleep(3600)\n",
        timeout=0.5,
    )
    assert got.error is not None
    # The thread's process is gone, and the next worker starts on a fresh, empty root.
    assert pid is not None and not pid_alive(pid)
    _still_works(raw)
    assert not (_root(raw) / "tick").exists()


def test_forked_children_die_with_the_worker(raw: ProcessExecutor) -> None:
    got = raw._run_raw(
        "import os, time\n"
        "kids = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(3600)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "result = kids\n"
    )
    assert len(got.value) == 3
    uid = raw._res.uid
    if uid is not None:
        assert len(_processes_of(uid)) == 4  # the worker and its three children
    raw._run_raw("while True: pass", timeout=0.5)
    if uid is not None:
        assert _processes_of(uid) == []
    else:
        assert raw.protections["kill_scope"] != "uid"
    _still_works(raw)


def _processes_of(uid: int) -> list[int]:
    """Host pids of every process (zombies included) whose real uid is ``uid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == uid:
                found.append(int(entry.name))
    return found


def test_os_exit_is_reported_and_the_next_call_works(raw: ProcessExecutor) -> None:
    got = raw._run_raw("import os; os._exit(3)")
    assert got.error is not None and "exit status 3" in got.error
    _still_works(raw)


def test_protections_report_every_layer(raw: ProcessExecutor) -> None:
    prot = raw.protections
    for key in (
        "wall_timeout_kill",
        "ipc_namespace",
        "filesystem_jail",
        "uid_drop",
        "capabilities_dropped",
        "empty_environment",
        "private_cwd",
        "rlimit_as",
        "rlimit_cpu",
        "rlimit_fsize",
        "rlimit_nofile",
        "rlimit_nproc",
        "rlimit_core",
    ):
        assert isinstance(prot[key], bool), key
    assert prot["network_namespace"] in ("own", "shared", False)
    assert prot["wall_timeout_kill"] is True
    assert prot["empty_environment"] is True
    assert prot["private_cwd"] is True
    assert isinstance(prot["notes"], str)


# -- finding 7: the OS layer holds against a fully hostile worker ------------------------

_DOUBLE_FORK = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        while True:\n"
    "            time.sleep(0.05)\n"
    "    os._exit(0)\n"
    "time.sleep(0.2)\n"
    "result = 'forked'\n"
)


def test_a_double_forked_setsid_orphan_is_gone_after_close() -> None:
    ex = ProcessExecutor(_allow_raw=True)
    assert ex._run_raw(_DOUBLE_FORK).value == "forked"
    uid = ex._res.uid
    if uid is None:  # no own uid here: the report must say what holds instead
        scope = ex.protections["kill_scope"]
        ex.close()
        assert scope != "uid"
        return
    # The worker, the orphan and its exited (zombie) intermediate parent.
    assert len(_processes_of(uid)) >= 2
    ex.close()
    assert _processes_of(uid) == []


def test_the_kill_scope_is_reported(raw: ProcessExecutor) -> None:
    prot = raw.protections
    assert prot["kill_scope"] in ("pid_namespace", "uid", "process_group")
    if prot["pid_namespace"]:
        assert prot["kill_scope"] == "pid_namespace"
    if prot["kill_scope"] == "process_group":
        assert "outlive close()" in str(prot["notes"])


def test_an_orphan_swapping_its_directory_for_a_symlink_chowns_no_host_file(
    tmp_path: Path,
) -> None:
    # A host directory the worker must never affect, with a file owned by some uid.
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "secret.txt"
    victim.write_text("host data")
    os.chown(victim, 12345, 12345)
    os.chown(victim_dir, 12345, 12345)
    ex = ProcessExecutor(_allow_raw=True)
    try:
        # An orphan that keeps turning its working directory's entries into links to
        # the victim, racing any privileged walk of that directory during a restart.
        got = ex._run_raw(
            "import os, time\n"
            "for i in range(20):\n"
            "    os.makedirs(f'd{i}/sub', exist_ok=True)\n"
            "    open(f'd{i}/sub/f', 'w').write('x')\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        while True:\n"
            "            for i in range(20):\n"
            "                try:\n"
            "                    os.rename(f'd{i}', f'old{i}')\n"
            f"                    os.symlink({str(victim_dir)!r}, f'd{{i}}')\n"
            "                    os.unlink(f'd{i}')\n"
            "                    os.rename(f'old{i}', f'd{i}')\n"
            "                except OSError:\n"
            "                    pass\n"
            "    os._exit(0)\n"
            "result = 'racing'\n"
        )
        assert got.value == "racing"
        for _ in range(5):
            # Each of these kills the worker; the next call starts a new one.
            ex._run_raw("import os; os._exit(1)")
            _still_works(ex)
    finally:
        ex.close()
    assert victim.stat().st_uid == 12345
    assert victim_dir.stat().st_uid == 12345
    assert victim.read_text() == "host data"


def test_worker_uids_are_distinct_across_many_starts() -> None:
    executors = [ProcessExecutor(_allow_raw=True) for _ in range(6)]
    try:
        seen: list[int | None] = []
        for ex in executors:
            ex.start()
            seen.append(ex._res.uid)
        # Restarts: each new worker of an env gets a uid never handed out before.
        for _ in range(6):
            ex = executors[0]
            ex._run_raw("import os; os._exit(1)")
            _still_works(ex)
            seen.append(ex._res.uid)
        if seen[0] is None:
            assert executors[0].protections["uid_drop"] is False
            return
        assert len(set(seen)) == len(seen)
        reported = {ex._run_raw("import os; result = os.getuid()").value for ex in executors}
        assert len(reported) == len(executors)
    finally:
        for ex in executors:
            ex.close()


def test_a_leased_uid_is_never_handed_out_by_another_process() -> None:
    if os.geteuid() != 0:
        pytest.skip("uid leases exist only for a root host")
    from rlm.sandbox.isolation import UidPool

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from rlm.sandbox.isolation import UidPool\n"
            "pool = UidPool(check_processes=False)\n"
            "print(pool.acquire(), flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        leased = int(holder.stdout.readline())
        pool = UidPool(check_processes=False)
        pool.next = leased - UID_BASE
        assert pool.acquire() != leased
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


def test_a_total_disk_limit_stops_a_cell_writing_many_files() -> None:
    with ProcessExecutor(_allow_raw=True, disk_limit_mb=8) as ex:
        got = ex._run_raw(
            "import errno\n"
            "chunk = b'x' * (1 << 20)\n"
            "written = 0\n"
            "try:\n"
            "    for i in range(100):\n"
            "        with open(f'file{i}.bin', 'wb') as f:\n"
            "            f.write(chunk)\n"
            "        written += 1\n"
            "except OSError as exc:\n"
            "    result = [written, exc.errno]\n"
        )
        if not ex.protections["disk_limit"]:
            assert "in total" in str(ex.protections["notes"])
            return
        written, err = got.value
        assert written <= 8
        assert err == 28  # ENOSPC
        # Many tiny files are bounded too (inodes), and the worker still works.
        many = ex._run_raw(
            "n = 0\n"
            "try:\n"
            "    while n < 100000:\n"
            "        open(f't{n}', 'w').close()\n"
            "        n += 1\n"
            "except OSError as exc:\n"
            "    result = [n, exc.errno]\n"
        )
        assert many.value[0] < 100000 and many.value[1] == 28
        _still_works(ex)


# Raw code finds the worker's own channel to the host and writes a frame nobody checked.
_NESTED_FRAME = (
    "import gc, os, struct, threading, time\n"
    "worker = next(o for o in gc.get_objects() if type(o).__name__ == 'WorkerChannel')\n"
    "fd = worker.fileno()\n"
    "body = b'[' * 200000 + b']' * 200000\n"
    "frame = struct.pack('!IQ', len(body), 0) + body\n"
    "def later():\n"
    "    time.sleep(0.3)\n"
    "    with worker.send_lock:\n"
    "        os.write(fd, frame)\n"
    "threading.Thread(target=later).start()\n"
    "result = fd\n"
)


def test_a_deeply_nested_frame_kills_the_worker_with_a_clear_error() -> None:
    with ProcessExecutor(_allow_raw=True) as ex:
        assert isinstance(ex._run_raw(_NESTED_FRAME).value, int)
        # A cell with no time limit is running when the frame arrives: it must return.
        outcome = ex.execute("import time\ntime.sleep(3)\n", None)
        assert outcome.error is not None
        assert "malformed message" in outcome.error
        assert "restarted" in outcome.error
        assert ex.execute("print(6 * 7)", None).stdout == "42\n"


def test_a_frame_larger_than_the_cap_is_refused_before_it_is_read() -> None:
    with ProcessExecutor(_allow_raw=True) as ex:
        got = ex._run_raw(
            "import gc, os, struct, threading, time\n"
            "worker = next(o for o in gc.get_objects() if type(o).__name__ == 'WorkerChannel')\n"
            "def later():\n"
            "    time.sleep(0.3)\n"
            "    with worker.send_lock:\n"
            "        os.write(worker.fileno(), struct.pack('!IQ', 1 << 31, 0))\n"
            "threading.Thread(target=later).start()\n"
            "result = 'armed'\n"
        )
        assert got.value == "armed"
        outcome = ex.execute("import time\ntime.sleep(3)\n", None)
        assert outcome.error is not None
        assert "2,147,483,648 bytes" in outcome.error and "the sandbox accepts" in outcome.error
        assert ex.execute("print(6 * 7)", None).stdout == "42\n"


def _forge_frame(ex: ProcessExecutor, msg: str, payload: str) -> None:
    """Raw code writes the frame ``msg`` (JSON text) with raw ``payload`` on the worker's
    channel to the host, as a compromised worker could."""
    got = ex._run_raw(
        "import gc, os, struct, threading, time\n"
        "worker = next(o for o in gc.get_objects() if type(o).__name__ == 'WorkerChannel')\n"
        f"body, payload = {msg!r}.encode(), {payload!r}.encode()\n"
        "def later():\n"
        "    time.sleep(0.3)\n"
        "    with worker.send_lock:\n"
        "        os.write(worker.fileno(), struct.pack('!IQ', len(body), len(payload)) + body + payload)\n"
        "threading.Thread(target=later).start()\n"
        "result = 'armed'\n"
    )
    assert got.value == "armed"


@pytest.mark.parametrize(
    ("msg", "payload"),
    [
        # A payload on a message that carries no prompts.
        ('{"op":"out","stream":"stdout","text":"x"}', "abc"),
        # Prompt lengths that run past the payload, or leave bytes of it unaccounted for.
        ('{"op":"items","id":1,"start":0,"prompts":[10]}', "abc"),
        ('{"op":"items","id":1,"start":0,"prompts":[1]}', "abc"),
        ('{"op":"query","id":1,"prompt":-1,"params":{}}', "abc"),
    ],
    ids=["payload-on-out", "past-the-payload", "bytes-left-over", "negative-length"],
)
def test_a_frame_whose_payload_does_not_match_its_prompts_kills_the_worker(
    msg: str, payload: str
) -> None:
    with ProcessExecutor(_allow_raw=True) as ex:
        _forge_frame(ex, msg, payload)
        outcome = ex.execute("import time\ntime.sleep(3)\n", None)
        assert outcome.error is not None
        assert "malformed message" in outcome.error and "restarted" in outcome.error
        assert ex.execute("print(6 * 7)", None).stdout == "42\n"


def test_a_frame_whose_payload_is_larger_than_the_cap_is_refused_before_it_is_read() -> None:
    with ProcessExecutor(_allow_raw=True) as ex:
        got = ex._run_raw(
            "import gc, os, struct, threading, time\n"
            "worker = next(o for o in gc.get_objects() if type(o).__name__ == 'WorkerChannel')\n"
            "def later():\n"
            "    time.sleep(0.3)\n"
            "    with worker.send_lock:\n"
            "        os.write(worker.fileno(), struct.pack('!IQ', 2, 1 << 31) + b'{}')\n"
            "threading.Thread(target=later).start()\n"
            "result = 'armed'\n"
        )
        assert got.value == "armed"
        outcome = ex.execute("import time\ntime.sleep(3)\n", None)
        assert outcome.error is not None
        assert "2,147,483,650 bytes" in outcome.error and "the sandbox accepts" in outcome.error
        assert ex.execute("print(6 * 7)", None).stdout == "42\n"


def test_cells_that_may_open_files_are_held_to_the_total_disk_limit() -> None:
    with ProcessExecutor(disk_limit_mb=8) as ex:
        if not ex.protections["file_access"] or not ex.protections["disk_limit"]:
            assert "in total" in str(ex.protections["notes"]) or not ex.protections["file_access"]
            return
        outcome = ex.execute(
            "written = 0\n"
            "chunk = 'x' * (1 << 20)\n"
            "for i in range(50):\n"
            "    with open(f'part{i}.txt', 'w') as f:\n"
            "        f.write(chunk)\n"
            "    written += 1\n",
            30.0,
        )
        assert outcome.error is not None and "No space left on device" in outcome.error
        assert ex.execute("print(written <= 8)", 30.0).stdout == "True\n"


# -- finding D: System V IPC and sockets after an escape ---------------------------------

_SYSV = (
    "import ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "IPC_CREAT = 0o1000\n"
    "KEY = 0x524C4D44\n"
)


def _sysv_keys(kind: str) -> set[int]:
    """Keys of the host's System V ``shm`` segments or ``msg`` queues (its own namespace)."""
    lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines}


def _remove_sysv(key: int) -> None:
    """Remove the host's segment and queue of ``key``, if any (they must not outlive a test)."""
    libc = ctypes.CDLL(None, use_errno=True)
    shm, msg = libc.shmget(key, 0, 0), libc.msgget(key, 0)
    if shm >= 0:
        libc.shmctl(shm, 0, None)  # IPC_RMID
    if msg >= 0:
        libc.msgctl(msg, 0, None)


@pytest.fixture
def sysv_key() -> Iterator[int]:
    key = 0x524C4D44
    yield key
    _remove_sysv(key)


def test_system_v_ipc_made_after_an_escape_stays_in_its_worker(sysv_key: int) -> None:
    key = sysv_key
    with ProcessExecutor(_allow_raw=True) as a, ProcessExecutor(_allow_raw=True) as b:
        made = a._run_raw(
            _SYSV + "shm = libc.shmget(KEY, 4 << 20, IPC_CREAT | 0o666)\n"
            "msg = libc.msgget(KEY, IPC_CREAT | 0o666)\n"
            "result = [shm >= 0, msg >= 0]\n"
        )
        assert made.value == [True, True], made
        if not a.protections["ipc_namespace"]:
            assert "IPC namespace" in str(a.protections["notes"])
            return
        # Neither the host nor another worker sees them...
        assert key not in _sysv_keys("shm") and key not in _sysv_keys("msg")
        seen = b._run_raw(_SYSV + "result = [libc.shmget(KEY, 0, 0), libc.msgget(KEY, 0)]\n")
        assert seen.value == [-1, -1]
        # ...and they end with their worker: its next incarnation starts without them.
        a._run_raw("import os\nos._exit(0)")
        again = a._run_raw(_SYSV + "result = [libc.shmget(KEY, 0, 0), libc.msgget(KEY, 0)]\n")
        assert again.value == [-1, -1]
        assert key not in _sysv_keys("shm") and key not in _sysv_keys("msg")


def test_two_workers_cannot_meet_on_an_abstract_unix_socket() -> None:
    name = "\0rlm-sandbox-test-meeting-point"  # abstract: a leading NUL
    with ProcessExecutor(_allow_raw=True) as a, ProcessExecutor(_allow_raw=True) as b:
        listening = a._run_raw(
            "import socket, sys\n"
            "server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"server.bind({name!r})\n"
            "server.listen()\n"
            "sys.modules['rlm.sandbox.worker'].kept_server = server\n"
            "probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"probe.connect({name!r})\n"  # it does listen, for its own process
            "result = 'listening'\n"
        )
        assert listening.value == "listening", listening
        reached = b._run_raw(
            "import socket\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"s.connect({name!r})\n"
            "result = 'connected'\n"
        )
        if a.protections["network_namespace"] != "own":
            assert "abstract Unix sockets" in str(a.protections["notes"])
            return
        assert reached.value is None and reached.error is not None
        assert "ConnectionRefusedError" in reached.error or "FileNotFoundError" in reached.error
