"""The process sandbox's OS layer holds on its own, with the policy bypassed.

Each test runs raw, unrestricted Python in a worker through the executor's test-only hook
(``_run_raw``, enabled by ``_allow_raw=True``; cells can never reach it) and shows that
the kernel, not the policy, stops the payload: no network, no environment, no files
outside the working directory, bounded memory, processes and file sizes, and a wall
timeout nothing inside the worker can resist. Where this machine does not grant a
protection, the test checks that ``protections`` says so instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm.sandbox import _worker
from rlm.sandbox import process as process_mod
from rlm.sandbox.process import ProcessExecutor
from rlm.testing import FakeLLMServer


@pytest.fixture
def raw() -> Iterator[ProcessExecutor]:
    ex = ProcessExecutor(context="the context", _allow_raw=True, memory_limit_mb=512)
    ex.start()
    yield ex
    ex.close()


def _still_works(ex: ProcessExecutor) -> None:
    assert ex._run_raw("result = 6 * 7").value == 42


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_environment_is_empty_even_with_a_secret_in_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-os-layer-12345")
    # A fresh template process, started while the canary is in the host's environment.
    process_mod._shutdown_zygote()
    with ProcessExecutor(_allow_raw=True) as ex:
        got = ex._run_raw("import os; result = dict(os.environ)")
        assert got.value == {}
        assert ex.protections["empty_environment"] is True
        zygote = process_mod._get_zygote()
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
    cwd = raw._res.cwd
    assert cwd is not None
    assert (Path(cwd) / "notes.txt").read_text() == "kept"


def test_working_directory_is_removed_on_close() -> None:
    ex = ProcessExecutor(_allow_raw=True)
    ex._run_raw("open('a.txt', 'w').write('x')")
    cwd = ex._res.cwd
    assert cwd is not None and Path(cwd).is_dir()
    ex.close()
    ex.close()
    assert not Path(cwd).exists()


def test_worker_runs_as_its_own_unprivileged_uid(raw: ProcessExecutor) -> None:
    uid = raw._run_raw("import os; result = [os.getuid(), os.geteuid(), os.getgroups()]").value
    if raw.protections["uid_drop"]:
        assert uid[0] == uid[1] == _worker.UID_BASE + raw._res.pid  # type: ignore[operator]
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
    cwd = raw._res.cwd
    assert cwd is not None
    assert (Path(cwd) / "big.bin").stat().st_size <= 64 << 20
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
    assert pid is not None and not _alive(pid)
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
    assert pid is not None and not _alive(pid)
    cwd = raw._res.cwd
    assert cwd is not None
    size = (Path(cwd) / "tick").stat().st_size
    # The next worker has started; the old thread is gone with its process.
    _still_works(raw)
    time.sleep(0.1)
    assert (Path(cwd) / "tick").stat().st_size == size


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
    kids = got.value
    assert all(_alive(k) for k in kids)
    raw._run_raw("while True: pass", timeout=0.5)
    # Killing the worker's process group took its children along.
    time.sleep(0.05)
    assert not any(_alive(k) and _not_zombie(k) for k in kids)
    _still_works(raw)


def _not_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_os_exit_is_reported_and_the_next_call_works(raw: ProcessExecutor) -> None:
    got = raw._run_raw("import os; os._exit(3)")
    assert got.error is not None and "exit status 3" in got.error
    _still_works(raw)


def test_protections_report_every_layer(raw: ProcessExecutor) -> None:
    prot = raw.protections
    for key in (
        "wall_timeout_kill",
        "network_namespace",
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
    assert prot["wall_timeout_kill"] is True
    assert prot["empty_environment"] is True
    assert prot["private_cwd"] is True
    assert isinstance(prot["notes"], str)
